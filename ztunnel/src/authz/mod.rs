//! Istio's security policies, decided in the node proxy (DESIGN §6).
//!
//! * [`peer_authentication`]: `PeerAuthentication`, the mutual-TLS mode of a workload's inbound
//!   side (STRICT refuses plaintext).
pub mod peer_authentication;

pub use peer_authentication::{MtlsDecision, MtlsMode, PeerAuthentication, PeerAuthentications};
