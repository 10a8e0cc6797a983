//! `ztunnel-cni`: the chained CNI plugin that hands new pods to the node proxy before they
//! start (see `ztunnel::cni::plugin`). Installed by `ztunnel cni install`.
fn main() -> std::process::ExitCode {
    ztunnel::cni::plugin::main()
}
