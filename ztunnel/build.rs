//! Builds the eBPF object from `../ebpf` with the nightly toolchain and places it in OUT_DIR,
//! where `capture::ebpf_object()` embeds it, without its DWARF sections (see [`strip_dwarf`]).
use std::path::Path;

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // The daemon's relative relocations packed (DT_RELR) instead of 24-byte RELA entries: the
    // dynamic loader reads them all at start, and they stay resident, so this takes ~0.9 MiB
    // off every proxy's RSS (docs/benchmarks.md). It needs glibc 2.36 (the image's Debian 12);
    // `ztunnel-cni` runs on the node's own glibc, which may be older, and keeps RELA.
    println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,-z,pack-relative-relocs");
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
    .context("building the eBPF programs (run `cargo xtask setup` if the toolchain is missing)")?;
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    strip_dwarf(&out.join("ztunnel-ebpf"))
}

/// Drops the object's DWARF (`.debug_*` and their `.rel.debug_*`), four fifths of its bytes.
/// The crate is built with `debug = 2` only because bpf-linker derives `.BTF` and `.BTF.ext`
/// (CO-RE relocations, function and line info) from the debug info; the loader reads those
/// two and never the DWARF, which would otherwise sit in the proxy's read-only data.
fn strip_dwarf(object: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let mut elf = object::build::elf::Builder::read(&*data)
        .with_context(|| format!("parsing {}", object.display()))?;
    for section in elf.sections.iter_mut() {
        let name = section.name.as_slice();
        if name.starts_with(b".debug_") || name.starts_with(b".rel.debug_") {
            section.delete = true;
        }
    }
    elf.delete_orphans();
    // bpf-linker's object names its sections from `.strtab`, which the writer keeps for the
    // symbols only: section names get their own table.
    let has_shstrtab = elf
        .sections
        .iter()
        .any(|s| matches!(s.data, object::build::elf::SectionData::SectionString));
    if !has_shstrtab {
        let names = elf.sections.add();
        names.name = b".shstrtab"[..].into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = object::build::elf::SectionData::SectionString;
    }
    let mut stripped = Vec::new();
    elf.write(&mut stripped)
        .with_context(|| format!("writing {} without DWARF", object.display()))?;
    std::fs::write(object, stripped).with_context(|| format!("writing {}", object.display()))
}
