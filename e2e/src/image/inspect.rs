//! Reads a docker-archive tarball back and checks it the way an importer would: one
//! manifest entry, a config whose file name is its sha256, and a layer whose sha256 is
//! the config's `rootfs.diff_ids`. Used by the tests and by `remora-images --verify`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{ImageError, hex, io_ctx};

/// One layer entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerEntry {
    File { mode: u32, data: Vec<u8> },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// A docker-archive tarball, read back and checked.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// Names of the archive's members, in order.
    pub members: Vec<String>,
    pub repo_tags: Vec<String>,
    /// The config JSON.
    pub config: serde_json::Value,
    /// `sha256:<hex>` of the config.
    pub id: String,
    /// Layer entries by path (no leading `/`, directories without the trailing `/`).
    pub layer: BTreeMap<String, LayerEntry>,
    /// Layer entry paths in archive order.
    pub layer_order: Vec<String>,
    /// Entries whose mtime, uid or gid is not 0.
    pub nondeterministic: Vec<String>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> ImageError {
    ImageError::Io {
        context: format!("reading image {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string()),
    }
}

/// Reads and checks `path`. Any inconsistency is an error.
pub fn inspect(path: &Path) -> Result<Inspected, ImageError> {
    let file = fs::File::open(path).map_err(io_ctx(format!("opening {}", path.display())))?;
    let mut outer = tar::Archive::new(file);
    let mut members = Vec::new();
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for entry in outer
        .entries()
        .map_err(io_ctx(format!("reading {}", path.display())))?
    {
        let mut entry = entry.map_err(io_ctx(format!("reading {}", path.display())))?;
        let name = entry
            .path()
            .map_err(io_ctx("member name"))?
            .to_string_lossy()
            .into_owned();
        members.push(name.clone());
        if entry.header().entry_type().is_file() {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(io_ctx(format!("reading member {name}")))?;
            blobs.insert(name, data);
        }
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        blobs
            .get("manifest.json")
            .ok_or_else(|| bad(path, "no manifest.json"))?,
    )
    .map_err(|e| bad(path, format!("manifest.json: {e}")))?;
    let [item] = manifest.as_array().map(Vec::as_slice).unwrap_or_default() else {
        return Err(bad(path, "manifest.json must list exactly one image"));
    };
    let config_name = item["Config"]
        .as_str()
        .ok_or_else(|| bad(path, "no Config"))?;
    let config_bytes = blobs
        .get(config_name)
        .ok_or_else(|| bad(path, format!("config {config_name} missing")))?;
    let config_hex = hex(&Sha256::digest(config_bytes));
    if config_name != format!("{config_hex}.json") {
        return Err(bad(
            path,
            format!("config {config_name} has sha256 {config_hex}"),
        ));
    }
    let config: serde_json::Value =
        serde_json::from_slice(config_bytes).map_err(|e| bad(path, format!("config: {e}")))?;
    let layers: Vec<&str> = item["Layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    let [layer_name] = layers.as_slice() else {
        return Err(bad(
            path,
            format!("expected one layer, found {}", layers.len()),
        ));
    };
    let layer_bytes = blobs
        .get(*layer_name)
        .ok_or_else(|| bad(path, format!("layer {layer_name} missing")))?;
    let layer_id = format!("sha256:{}", hex(&Sha256::digest(layer_bytes)));
    if diff_ids != [layer_id.as_str()] {
        return Err(bad(
            path,
            format!("diff_ids {diff_ids:?} but the layer is {layer_id}"),
        ));
    }
    let repo_tags = item["RepoTags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();

    let mut layer = BTreeMap::new();
    let mut layer_order = Vec::new();
    let mut nondeterministic = Vec::new();
    let mut inner = tar::Archive::new(layer_bytes.as_slice());
    for entry in inner.entries().map_err(io_ctx("reading the layer"))? {
        let mut entry = entry.map_err(io_ctx("reading the layer"))?;
        let raw = entry
            .path()
            .map_err(io_ctx("layer entry name"))?
            .to_string_lossy()
            .into_owned();
        let name = raw.trim_end_matches('/').to_owned();
        let h = entry.header();
        if h.mtime().ok() != Some(0) || h.uid().ok() != Some(0) || h.gid().ok() != Some(0) {
            nondeterministic.push(name.clone());
        }
        let mode = h.mode().map_err(io_ctx(format!("mode of {name}")))?;
        let kind = h.entry_type();
        let e = if kind.is_dir() {
            LayerEntry::Dir { mode }
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(io_ctx(format!("link of {name}")))?
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            LayerEntry::Symlink { target }
        } else {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(io_ctx(format!("reading {name}")))?;
            LayerEntry::File { mode, data }
        };
        layer_order.push(name.clone());
        if layer.insert(name.clone(), e).is_some() {
            return Err(bad(path, format!("layer entry {name} appears twice")));
        }
    }
    Ok(Inspected {
        members,
        repo_tags,
        config,
        id: format!("sha256:{config_hex}"),
        layer,
        layer_order,
        nondeterministic,
    })
}

impl Inspected {
    /// Resolves `path` (absolute, in the image) through the layer's symlinks to the file
    /// it names, as the kernel would; `None` when it dangles.
    pub fn resolve(&self, path: &str) -> Option<(&str, &LayerEntry)> {
        let mut current: Vec<String> = Vec::new();
        let mut pending: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(str::to_owned)
            .collect();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            match comp.as_str() {
                "." => continue,
                ".." => {
                    current.pop();
                    continue;
                }
                _ => current.push(comp),
            }
            let key = current.join("/");
            if let Some(LayerEntry::Symlink { target }) = self.layer.get(&key) {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                current.pop();
                if target.starts_with('/') {
                    current.clear();
                }
                pending.extend(
                    target
                        .split('/')
                        .filter(|c| !c.is_empty())
                        .rev()
                        .map(str::to_owned),
                );
            }
        }
        let key = current.join("/");
        self.layer.get_key_value(&key).map(|(k, v)| (k.as_str(), v))
    }
}
