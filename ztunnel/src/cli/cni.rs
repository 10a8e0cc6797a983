//! `ztunnel cni install|uninstall`: the chained CNI plugin (`ztunnel-cni`) in a node's CNI
//! directories.
use anyhow::{Context as _, Result};

use super::CniCommand;
use crate::cni;

/// `cni install` and `cni uninstall`.
pub fn command(command: CniCommand) -> Result<()> {
    match command {
        CniCommand::Install {
            bin_dir,
            conf_dir,
            socket,
            plugin,
        } => {
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe()
                    .context("finding this binary")?
                    .with_file_name(cni::PLUGIN_NAME),
            };
            let done = cni::install::install(&bin_dir, &conf_dir, &socket, &plugin)?;
            println!(
                "{} {} ({})",
                if done.binary_changed {
                    "installed"
                } else {
                    "unchanged"
                },
                done.binary.display(),
                plugin.display()
            );
            println!(
                "{} {}: {} is the last plugin of the chain, socket {}",
                if done.conflist_changed {
                    "updated"
                } else {
                    "unchanged"
                },
                done.conflist.display(),
                cni::PLUGIN_NAME,
                socket.display()
            );
            Ok(())
        }
        CniCommand::Uninstall {
            bin_dir,
            conf_dir,
            socket,
        } => {
            let done = cni::install::uninstall(&bin_dir, &conf_dir, Some(&socket))?;
            for f in &done.conflists {
                println!("removed {} from {}", cni::PLUGIN_NAME, f.display());
            }
            if done.binary_removed {
                println!("removed {}", bin_dir.join(cni::PLUGIN_NAME).display());
            }
            if done.conflists.is_empty() && !done.binary_removed {
                println!("{} was not installed", cni::PLUGIN_NAME);
            }
            Ok(())
        }
    }
}
