//! The node proxy: capture (eBPF), configuration, and the proxy paths. See `docs/` and DESIGN.md.
pub mod admin;
pub mod authz;
pub mod capture;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod kubernetes;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod policy_check;
pub mod ports;
pub mod proxy;
pub mod relay;
pub mod socket;
pub mod state;
pub mod tls;
