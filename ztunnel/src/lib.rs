//! The node proxy: capture (eBPF), configuration, and the proxy paths. See `docs/` and DESIGN.md.
pub mod admin;
pub mod authz;
pub mod capture;
pub mod cni;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod kubernetes;
pub mod netns;
pub mod proxy;
pub mod state;
pub mod tls;
