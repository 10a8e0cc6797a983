//! `ztunnel cni install` and `ztunnel cni uninstall`: the plugin binary in the CNI bin
//! directory and its entry at the end of the node's plugin chain.
//!
//! The node's network is the first configuration file of the conf directory in name order
//! with the extension `.conflist`, `.conf` or `.json`, which is the one containerd and CRI-O
//! load. Only a `.conflist` has a chain to join; a single-plugin `.conf` is refused with the
//! reason (converting it would mean renaming the primary CNI's file, which its own agent may
//! rewrite).
//!
//! Both commands are idempotent and never leave a half-written file: the binary and the
//! conflist are written to a temporary file in the same directory and renamed over the old
//! one; the binary is in place before the conflist names it, and the conflist entry is gone
//! before the binary is removed. Key order and every other plugin's entry are kept.
use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_yaml::{Mapping, Value};

use super::{node_state, PLUGIN_NAME};

/// What `install` did.
#[derive(Debug)]
pub struct Installed {
    pub binary: PathBuf,
    pub conflist: PathBuf,
    /// Whether the conflist had to change (false: it already ended with this entry).
    pub conflist_changed: bool,
    pub binary_changed: bool,
}

/// Copies `plugin` to `bin_dir/ztunnel-cni` and makes `{"type": "ztunnel-cni", "socket":
/// SOCKET}` the last plugin of the node's conflist (moving an existing entry there).
pub fn install(bin_dir: &Path, conf_dir: &Path, socket: &Path, plugin: &Path) -> Result<Installed> {
    let conflist = network_file(conf_dir)?;
    if conflist.extension().and_then(|e| e.to_str()) != Some("conflist") {
        bail!(
            "{} is a single-plugin network configuration: {PLUGIN_NAME} can only be chained in a .conflist \
             (write the network as {{\"cniVersion\", \"name\", \"plugins\": [...]}} in a .conflist file)",
            conflist.display()
        );
    }
    let text = std::fs::read_to_string(&conflist)
        .with_context(|| format!("reading {}", conflist.display()))?;
    let mut doc = parse_conflist(&text, &conflist)?;
    let plugins = plugins_mut(&mut doc, &conflist)?;
    let mut entry = Mapping::new();
    entry.insert("type".into(), PLUGIN_NAME.into());
    entry.insert(
        "socket".into(),
        socket.to_string_lossy().into_owned().into(),
    );
    let entry = Value::Mapping(entry);
    let already =
        plugins.last() == Some(&entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1;

    let binary = bin_dir.join(PLUGIN_NAME);
    let new_bytes = std::fs::read(plugin)
        .with_context(|| format!("reading the plugin {}", plugin.display()))?;
    let binary_changed = std::fs::read(&binary).ok().as_ref() != Some(&new_bytes);
    if binary_changed {
        write_atomic(&binary, &new_bytes, 0o755)?;
    }
    if !already {
        plugins.retain(|p| !is_ours(p));
        plugins.push(entry);
        let mode = file_mode(&conflist);
        write_atomic(&conflist, render(&doc)?.as_bytes(), mode)?;
    }
    Ok(Installed {
        binary,
        conflist,
        conflist_changed: !already,
        binary_changed,
    })
}

/// What `uninstall` did.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub conflists: Vec<PathBuf>,
    pub binary_removed: bool,
    pub state_file_removed: bool,
}

/// Removes every `ztunnel-cni` entry from the conflists of `conf_dir`, then the binary, then
/// (with `socket`) the node state file next to that socket.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path, socket: Option<&Path>) -> Result<Uninstalled> {
    let mut done = Uninstalled::default();
    for file in config_files(conf_dir)? {
        if file.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let mut doc = parse_conflist(&text, &file)?;
        let plugins = plugins_mut(&mut doc, &file)?;
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            write_atomic(&file, render(&doc)?.as_bytes(), file_mode(&file))?;
            done.conflists.push(file);
        }
    }
    done.binary_removed = remove_if_exists(&bin_dir.join(PLUGIN_NAME))?;
    if let Some(socket) = socket {
        done.state_file_removed = remove_if_exists(&node_state::path_for_socket(socket))?;
    }
    Ok(done)
}

fn remove_if_exists(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_NAME)
}

/// Network configuration files in the order the runtime reads them.
fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(conf_dir).with_context(|| {
        format!(
            "reading the CNI configuration directory {}",
            conf_dir.display()
        )
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The file that defines the node's network.
fn network_file(conf_dir: &Path) -> Result<PathBuf> {
    config_files(conf_dir)?.into_iter().next().ok_or_else(|| {
        anyhow!(
            "{} has no network configuration (.conflist, .conf or .json) yet: install the node's CNI first, \
             then run `ztunnel cni install` again",
            conf_dir.display()
        )
    })
}

/// Parses a conflist keeping its key order. JSON is valid YAML and `serde_yaml` keeps mapping
/// order; the result is checked against a plain JSON parse, so nothing YAML-specific slips in.
fn parse_conflist(text: &str, file: &Path) -> Result<Value> {
    let json: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let doc: Value = serde_yaml::from_str(text)
        .with_context(|| format!("{} cannot be read keeping its key order", file.display()))?;
    if serde_json::to_value(&doc).ok().as_ref() != Some(&json) {
        bail!(
            "{} reads differently as JSON and as YAML; edit it by hand",
            file.display()
        );
    }
    if doc.get("cniVersion").and_then(Value::as_str).is_none() {
        bail!(
            "{} has no cniVersion: it is not a network configuration list",
            file.display()
        );
    }
    Ok(doc)
}

fn plugins_mut<'a>(doc: &'a mut Value, file: &Path) -> Result<&'a mut Vec<Value>> {
    let plugins = doc
        .get_mut("plugins")
        .and_then(Value::as_sequence_mut)
        .ok_or_else(|| anyhow!("{} has no \"plugins\" list", file.display()))?;
    if let Some(bad) = plugins
        .iter()
        .position(|p| p.get("type").and_then(Value::as_str).is_none())
    {
        bail!(
            "{}: plugin {bad} of the chain has no \"type\"",
            file.display()
        );
    }
    Ok(plugins)
}

fn render(doc: &Value) -> Result<String> {
    let mut text = serde_json::to_string_pretty(doc).context("rendering the conflist")?;
    text.push('\n');
    Ok(text)
}

fn file_mode(path: &Path) -> u32 {
    std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// a reader sees the old or the new file, never a part.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    // A dot name with no configuration extension: the runtime never reads it.
    let tmp = dir.join(format!(".{name}.ztunnel-{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(mode)))
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs(PathBuf);
    impl Dirs {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("ztunnel-cni-install-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            for sub in ["bin", "conf", "src"] {
                std::fs::create_dir_all(d.join(sub)).unwrap();
            }
            std::fs::write(d.join("src").join(PLUGIN_NAME), b"plugin v1").unwrap();
            Self(d)
        }
        fn bin(&self) -> PathBuf {
            self.0.join("bin")
        }
        fn conf(&self) -> PathBuf {
            self.0.join("conf")
        }
        fn plugin(&self) -> PathBuf {
            self.0.join("src").join(PLUGIN_NAME)
        }
    }
    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]]}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn types(file: &Path) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn install_appends_once_keeps_order_and_uninstall_reverses_it() {
        let d = Dirs::new("roundtrip");
        let file = d.conf().join("10-bridge.conflist");
        std::fs::write(&file, BRIDGE).unwrap();
        std::fs::write(d.conf().join("99-later.conflist"), BRIDGE).unwrap();
        let sock = Path::new("/var/run/ztunnel/cni.sock");
        let done = install(&d.bin(), &d.conf(), sock, &d.plugin()).unwrap();
        assert_eq!(
            done.conflist, file,
            "the first file in name order is the network"
        );
        assert!(done.conflist_changed && done.binary_changed);
        assert_eq!(types(&file), ["bridge", "portmap", PLUGIN_NAME]);
        assert_eq!(
            std::fs::read(d.bin().join(PLUGIN_NAME)).unwrap(),
            b"plugin v1"
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.find("cniVersion").unwrap() < text.find("\"name\"").unwrap(),
            "key order kept:\n{text}"
        );
        assert!(
            text.contains("\"socket\": \"/var/run/ztunnel/cni.sock\""),
            "{text}"
        );
        assert_eq!(
            types(&d.conf().join("99-later.conflist")),
            ["bridge", "portmap"]
        );

        // Again: nothing changes, the file is not rewritten.
        let before = std::fs::metadata(&file).unwrap().modified().unwrap();
        let again = install(&d.bin(), &d.conf(), sock, &d.plugin()).unwrap();
        assert!(!again.conflist_changed && !again.binary_changed);
        assert_eq!(
            std::fs::metadata(&file).unwrap().modified().unwrap(),
            before
        );

        // Another socket, or an entry not at the end, is moved and replaced, never doubled.
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let ours = v["plugins"].as_array_mut().unwrap().pop().unwrap();
        v["plugins"].as_array_mut().unwrap().insert(0, ours);
        std::fs::write(&file, v.to_string()).unwrap();
        install(
            &d.bin(),
            &d.conf(),
            Path::new("/run/other.sock"),
            &d.plugin(),
        )
        .unwrap();
        assert_eq!(types(&file), ["bridge", "portmap", PLUGIN_NAME]);
        assert!(std::fs::read_to_string(&file)
            .unwrap()
            .contains("/run/other.sock"));

        let names: Vec<String> = std::fs::read_dir(d.conf())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.contains(".tmp")),
            "no temporary file left: {names:?}"
        );

        let gone = uninstall(&d.bin(), &d.conf(), Some(sock)).unwrap();
        assert_eq!(gone.conflists, vec![file.clone()]);
        assert!(gone.binary_removed);
        assert_eq!(types(&file), ["bridge", "portmap"]);
        assert!(!d.bin().join(PLUGIN_NAME).exists());
        let twice = uninstall(&d.bin(), &d.conf(), Some(sock)).unwrap();
        assert!(twice.conflists.is_empty() && !twice.binary_removed);
    }

    #[test]
    fn unusable_configurations_are_refused_and_left_alone() {
        let d = Dirs::new("refused");
        let sock = Path::new("/s.sock");
        let e = install(&d.bin(), &d.conf(), sock, &d.plugin()).unwrap_err();
        assert!(
            format!("{e:#}").contains("no network configuration"),
            "{e:#}"
        );
        let conf = d.conf().join("10-bridge.conf");
        std::fs::write(
            &conf,
            r#"{"cniVersion":"1.0.0","name":"k8s","type":"bridge"}"#,
        )
        .unwrap();
        let e = install(&d.bin(), &d.conf(), sock, &d.plugin()).unwrap_err();
        assert!(format!("{e:#}").contains("single-plugin"), "{e:#}");
        std::fs::remove_file(&conf).unwrap();
        for (text, why) in [
            ("{not json", "not valid JSON"),
            (r#"{"name":"k8s","plugins":[]}"#, "no cniVersion"),
            (r#"{"cniVersion":"1.0.0","name":"k8s"}"#, "no \"plugins\""),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"bridge":"x"}]}"#,
                "no \"type\"",
            ),
        ] {
            let file = d.conf().join("10-x.conflist");
            std::fs::write(&file, text).unwrap();
            let e = install(&d.bin(), &d.conf(), sock, &d.plugin()).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{text}: {e:#}");
            assert_eq!(
                std::fs::read_to_string(&file).unwrap(),
                text,
                "left as it was"
            );
        }
        assert!(
            !d.bin().join(PLUGIN_NAME).exists(),
            "nothing installed for a refused network"
        );
    }
}
