//! The node proxy: capture (eBPF), configuration, and the proxy paths. docs/architecture.md
//! maps the modules and follows one connection through them.
pub mod admin;
pub mod app;
pub mod authz;
pub mod capture;
pub mod cli;
pub mod cni;
pub mod config;
pub mod enrolment;
pub mod hbone;
pub mod identity;
pub mod kubernetes;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod policy_check;
pub mod ports;
pub mod proxy;
pub mod relay;
pub mod route_check;
pub mod socket;
pub mod state;
pub mod tls;
pub mod traffic;
