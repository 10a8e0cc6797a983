//! Capture from a pod's first instruction: the chained CNI plugin `ztunnel-cni` and the node
//! proxy's side of it (docs/capture.md, "New pods: the CNI plugin").
//!
//! The container runtime runs the node's CNI plugin chain when it creates a pod's sandbox,
//! before any container of the pod starts. `ztunnel-cni`, last in the chain, hands the pod to
//! the node proxy (identity, addresses from the previous plugin's result, and a descriptor of
//! its network namespace) and returns only when the proxy has enrolled it or answered that it
//! is not to be captured. A pod of a captured namespace therefore never runs uncaptured: its
//! sandbox is not created (the kubelet retries) until capture is in force.
//!
//! * [`protocol`]: the messages between plugin and proxy, one JSON message per
//!   `SOCK_SEQPACKET` datagram, the netns descriptor passed with `SCM_RIGHTS`.
//! * [`plugin`]: the plugin itself (CNI spec 1.0.0: ADD, DEL, CHECK, VERSION).
//! * [`server`]: the proxy's socket (`ztunnel run --cni-socket`).
//! * [`registry`]: pods as the CNI reported them; they win over the configuration's netns and
//!   addresses.
//! * [`node_state`]: the file the plugin reads when the proxy cannot be reached, so pods of
//!   captured namespaces fail closed while the others still start.
//! * [`install`]: `ztunnel cni install|uninstall`, the plugin binary and the conflist entry.
//!
//! The proxy's answers, decided on its main loop with the enroller, are enrolment's
//! ([`crate::enrolment::cni`]).
pub mod install;
pub mod node_state;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod server;

/// Where the proxy listens and the plugin connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/cni.sock";
/// The plugin's `type` in the conflist and its file name in the CNI bin directory.
pub const PLUGIN_NAME: &str = "ztunnel-cni";
