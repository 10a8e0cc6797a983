//! Builds the eBPF object from `../ebpf` with the nightly toolchain and places it in OUT_DIR,
//! where `capture::ebpf_object()` embeds it.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // AYA_BUILD_SKIP=1 (quick checks without the nightly toolchain) leaves an empty object;
    // the proxy then refuses to start with a clear message.
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        let object = out.join("ztunnel-ebpf");
        if !object.exists() {
            std::fs::write(&object, b"").context("writing the empty eBPF placeholder")?;
        }
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "ztunnel-ebpf")
        .ok_or_else(|| anyhow!("ztunnel-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("ztunnel-ebpf has no directory"))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ztunnel-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (run `cargo xtask setup` if the toolchain is missing)")
}
