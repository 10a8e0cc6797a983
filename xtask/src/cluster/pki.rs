//! The cluster's certificates, made with openssl: one CA signs the API server's serving
//! certificate, every client certificate (admin, controller-manager, scheduler, the API server
//! towards the kubelets, each node) and the kubelets' serving certificates. P-256 keys: fast to
//! make, accepted by every component.
use std::{path::Path, process::Command};

use anyhow::Result;

use crate::output;

pub struct Leaf<'a> {
    /// File stem: `<name>.crt`, `<name>.key`.
    pub name: &'a str,
    pub cn: &'a str,
    pub org: Option<&'a str>,
    /// subjectAltName entries (`IP:…`, `DNS:…`); serving certificates only.
    pub sans: &'a [String],
}

fn key(path: &Path) -> Result<()> {
    output(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .arg("-out")
            .arg(path),
    )?;
    Ok(())
}

/// The CA (`ca.crt`, `ca.key`) and a key pair for service-account tokens (`sa.key`, `sa.pub`).
pub fn init(dir: &Path) -> Result<()> {
    key(&dir.join("ca.key"))?;
    output(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-new",
                "-days",
                "3650",
                "-subj",
                "/CN=ztk-cluster-ca",
            ])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-key")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(dir.join("ca.crt")),
    )?;
    key(&dir.join("sa.key"))?;
    output(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(dir.join("sa.key"))
            .arg("-out")
            .arg(dir.join("sa.pub")),
    )?;
    Ok(())
}

pub fn leaf(dir: &Path, leaf: &Leaf) -> Result<()> {
    let key_path = dir.join(format!("{}.key", leaf.name));
    key(&key_path)?;
    let subject = match leaf.org {
        Some(o) => format!("/O={o}/CN={}", leaf.cn),
        None => format!("/CN={}", leaf.cn),
    };
    let usage = if leaf.sans.is_empty() {
        "extendedKeyUsage=clientAuth"
    } else {
        "extendedKeyUsage=serverAuth,clientAuth"
    };
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-new", "-days", "365", "-subj", &subject])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args([
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment",
        ])
        .args(["-addext", usage])
        .arg("-key")
        .arg(&key_path)
        .arg("-CA")
        .arg(dir.join("ca.crt"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join(format!("{}.crt", leaf.name)));
    if !leaf.sans.is_empty() {
        cmd.arg("-addext")
            .arg(format!("subjectAltName={}", leaf.sans.join(",")));
    }
    output(&mut cmd)?;
    Ok(())
}

/// A kubeconfig for `server` authenticating with the client certificate `name`.
pub fn kubeconfig(dir: &Path, name: &str, server: &str) -> String {
    let d = dir.display();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ztk\n  cluster:\n    server: {server}\n    \
         certificate-authority: {d}/ca.crt\nusers:\n- name: {name}\n  user:\n    \
         client-certificate: {d}/{name}.crt\n    client-key: {d}/{name}.key\ncontexts:\n- name: ztk\n  \
         context: {{cluster: ztk, user: {name}}}\ncurrent-context: ztk\n"
    )
}
