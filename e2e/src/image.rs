//! Container images without Docker or a registry: a docker-archive tarball
//! (`docker save` format 1.2) written by our own code.
//!
//! An [`Image`] is a name:tag, the runtime config (entrypoint, cmd, user, env, workdir)
//! and the contents of its single layer: files copied from the host or given as bytes,
//! directories and symlinks. [`Image::write`] produces a tarball holding `manifest.json`,
//! the config JSON (`<sha256>.json`, whose `rootfs.diff_ids` is the sha256 of the
//! uncompressed layer), `<sha256>/layer.tar` and `repositories`. That is what
//! `ctr -n k8s.io images import`, `docker load` and `kind load image-archive` all read.
//!
//! Output is deterministic: entries sorted by path, parents created explicitly, every
//! mtime 0 and owner 0:0, so the same inputs give the same bytes (and image ID).
//!
//! [`deps`] finds what a dynamically linked binary needs (`ldd`); [`recipes`] assembles
//! Remora's own images from the workspace's release binaries.

pub mod deps;
pub mod inspect;
pub mod recipes;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

/// Errors of image assembly.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image reference '{0}' must be name:tag (a tag is required, and not 'latest': pods must never pull)"
    )]
    BadReference(String),
    #[error("image path '{0}' must be absolute and must not contain '..' or be '/'")]
    BadPath(String),
    #[error("image path {path} is added twice with different contents ({first} vs {second})")]
    Conflict {
        path: String,
        first: String,
        second: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("`ldd {binary}` failed: {message}")]
    Ldd { binary: String, message: String },
    #[error("{what} is missing on this host: {how}")]
    Missing { what: String, how: String },
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// One entry of the layer, keyed by its absolute path in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file with these contents and permission bits.
    File { data: Vec<u8>, mode: u32 },
    /// A directory.
    Dir { mode: u32 },
    /// A symbolic link to `target` (relative or absolute, as on the host).
    Symlink { target: String },
}

impl Entry {
    fn describe(&self) -> String {
        match self {
            Entry::File { data, mode } => {
                format!(
                    "file of {} bytes, mode {mode:o}, sha256 {}",
                    data.len(),
                    hex(&Sha256::digest(data))
                )
            }
            Entry::Dir { mode } => format!("directory, mode {mode:o}"),
            Entry::Symlink { target } => format!("symlink to {target}"),
        }
    }
}

/// An image being assembled. See the module docs.
#[derive(Debug, Clone)]
pub struct Image {
    reference: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: Option<String>,
    env: Vec<String>,
    workdir: Option<String>,
    entries: BTreeMap<String, Entry>,
}

/// What [`Image::write`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The tarball.
    pub path: PathBuf,
    /// The image reference (`RepoTags`).
    pub reference: String,
    /// `sha256:<hex>` of the config JSON: the image ID `docker images` shows.
    pub id: String,
    /// `sha256:<hex>` of the uncompressed layer (`rootfs.diff_ids[0]`).
    pub diff_id: String,
    /// Size of the tarball in bytes.
    pub size: u64,
    /// Size of the layer in bytes.
    pub layer_size: u64,
}

/// The default search path of the images, so that hooks may run `remora-proxy ...`.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Image {
    /// A new, empty image named `reference` (`registry/name:tag`).
    pub fn new(reference: &str) -> Result<Self, ImageError> {
        let (_, tag) = split_reference(reference)?;
        if tag == "latest" {
            return Err(ImageError::BadReference(reference.to_owned()));
        }
        Ok(Self {
            reference: reference.to_owned(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            user: None,
            env: vec![DEFAULT_PATH.to_owned()],
            workdir: None,
            entries: BTreeMap::new(),
        })
    }

    /// The image reference.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The layer's entries, by absolute path.
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    pub fn entrypoint<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn cmd<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd = args.into_iter().map(Into::into).collect();
        self
    }

    /// `uid:gid` (or a user name present in the image's /etc/passwd).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets `name=value`, replacing an earlier value of `name` (PATH included).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        let prefix = format!("{name}=");
        self.env.retain(|e| !e.starts_with(&prefix));
        self.env.push(format!("{name}={value}"));
        self
    }

    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// A file with the given contents at `dst`.
    pub fn bytes(
        &mut self,
        dst: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<&mut Self, ImageError> {
        self.insert(
            dst,
            Entry::File {
                data: data.into(),
                mode,
            },
        )
    }

    /// The host file `src` (symlinks followed) copied to `dst`.
    pub fn file(&mut self, src: &Path, dst: &str, mode: u32) -> Result<&mut Self, ImageError> {
        let data = fs::read(src).map_err(io_ctx(format!("reading {}", src.display())))?;
        self.insert(dst, Entry::File { data, mode })
    }

    /// A directory (its parents are created too).
    pub fn dir(&mut self, dst: &str, mode: u32) -> Result<&mut Self, ImageError> {
        self.insert(dst, Entry::Dir { mode })
    }

    /// A symlink at `dst` pointing to `target`.
    pub fn symlink(&mut self, dst: &str, target: &str) -> Result<&mut Self, ImageError> {
        self.insert(
            dst,
            Entry::Symlink {
                target: target.to_owned(),
            },
        )
    }

    /// The host path `src` at the same path in the image, as the host lays it out: a
    /// symlinked ancestor (`/lib` → `usr/lib` on merged-/usr systems) becomes the same
    /// symlink, a symlink becomes a symlink and its target is added as well, and a
    /// regular file keeps its permission bits. This is how shared libraries keep their
    /// sonames and `iptables-nft-restore` stays a link to `xtables-nft-multi`.
    pub fn host_path(&mut self, src: &Path) -> Result<&mut Self, ImageError> {
        let mut seen = 0;
        self.host_path_inner(src, &mut seen)?;
        Ok(self)
    }

    fn host_path_inner(&mut self, src: &Path, depth: &mut u32) -> Result<(), ImageError> {
        *depth += 1;
        if *depth > 40 {
            return Err(ImageError::BadPath(format!(
                "{} (too many levels of symlinks)",
                src.display()
            )));
        }
        if !src.is_absolute() {
            return Err(ImageError::BadPath(src.display().to_string()));
        }
        // Walk the ancestors: the first symlinked one is recreated, and the rest of the
        // path is resolved through its target.
        let mut prefix = PathBuf::from("/");
        let comps: Vec<Component<'_>> = src.components().skip(1).collect();
        for (i, comp) in comps.iter().enumerate() {
            let Component::Normal(name) = comp else {
                return Err(ImageError::BadPath(src.display().to_string()));
            };
            prefix.push(name);
            let meta = fs::symlink_metadata(&prefix)
                .map_err(io_ctx(format!("inspecting {}", prefix.display())))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&prefix)
                    .map_err(io_ctx(format!("reading link {}", prefix.display())))?;
                let target_str = target
                    .to_str()
                    .ok_or_else(|| ImageError::BadPath(target.display().to_string()))?;
                self.symlink(path_str(&prefix)?, target_str)?;
                let parent = prefix.parent().unwrap_or(Path::new("/"));
                let mut resolved = parent.join(&target);
                for rest in &comps[i + 1..] {
                    resolved.push(rest);
                }
                return self.host_path_inner(&normalize(&resolved), depth);
            }
            if i + 1 == comps.len() {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                if meta.is_dir() {
                    self.dir(path_str(&prefix)?, mode)?;
                } else {
                    self.file(&prefix, path_str(&prefix)?, mode)?;
                }
            }
        }
        Ok(())
    }

    fn insert(&mut self, dst: &str, entry: Entry) -> Result<&mut Self, ImageError> {
        let key = check_path(dst)?;
        // Parents: explicit directories, so every tool sees the same tree.
        let mut parent = Path::new(&key).parent();
        while let Some(p) = parent {
            let ps = p.to_string_lossy().into_owned();
            if ps == "/" {
                break;
            }
            match self.entries.get(&ps) {
                None => {
                    self.entries.insert(ps, Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(other) => {
                    return Err(ImageError::Conflict {
                        path: ps,
                        first: other.describe(),
                        second: "directory (parent)".into(),
                    });
                }
            }
            parent = p.parent();
        }
        match self.entries.get(&key) {
            Some(existing) if *existing == entry => {}
            // An explicit directory mode wins over the default of an implied parent.
            Some(Entry::Dir { .. }) if matches!(entry, Entry::Dir { .. }) => {
                self.entries.insert(key, entry);
            }
            Some(existing) => {
                return Err(ImageError::Conflict {
                    path: key,
                    first: existing.describe(),
                    second: entry.describe(),
                });
            }
            None => {
                self.entries.insert(key, entry);
            }
        }
        Ok(self)
    }

    /// The uncompressed layer tar.
    pub fn layer(&self) -> Result<Vec<u8>, ImageError> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let rel = &path[1..];
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            let ctx = || format!("adding {path} to the layer");
            match entry {
                Entry::File { data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, rel, data.as_slice())
                        .map_err(io_ctx(ctx()))?;
                }
                Entry::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{rel}/"), io::empty())
                        .map_err(io_ctx(ctx()))?;
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, rel, target).map_err(io_ctx(ctx()))?;
                }
            }
        }
        b.into_inner().map_err(io_ctx("finishing the layer"))
    }

    /// The image config JSON for a layer with this diff ID.
    pub fn config_json(&self, diff_id: &str) -> Vec<u8> {
        let mut config = serde_json::Map::new();
        config.insert("Env".into(), json!(self.env));
        if !self.entrypoint.is_empty() {
            config.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            config.insert("Cmd".into(), json!(self.cmd));
        }
        if let Some(u) = &self.user {
            config.insert("User".into(), json!(u));
        }
        if let Some(w) = &self.workdir {
            config.insert("WorkingDir".into(), json!(w));
        }
        let doc = json!({
            "architecture": go_arch(),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "remora-images (remora-e2e)"}],
        });
        // A Value serialises infallibly.
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// Writes the docker-archive tarball to `path` (its directory must exist).
    pub fn write(&self, path: &Path) -> Result<Written, ImageError> {
        let layer = self.layer()?;
        let layer_hex = hex(&Sha256::digest(&layer));
        let diff_id = format!("sha256:{layer_hex}");
        let config = self.config_json(&diff_id);
        let config_hex = hex(&Sha256::digest(&config));
        let (repo, tag) = split_reference(&self.reference)?;
        let manifest = json!([{
            "Config": format!("{config_hex}.json"),
            "RepoTags": [self.reference],
            "Layers": [format!("{layer_hex}/layer.tar")],
        }]);
        let repositories = json!({ repo: { tag: layer_hex } });
        let files: Vec<(String, Vec<u8>)> = vec![
            (format!("{config_hex}.json"), config),
            (format!("{layer_hex}/VERSION"), b"1.0".to_vec()),
            (format!("{layer_hex}/layer.tar"), layer.clone()),
            (
                "manifest.json".into(),
                serde_json::to_vec(&manifest).unwrap_or_default(),
            ),
            (
                "repositories".into(),
                serde_json::to_vec(&repositories).unwrap_or_default(),
            ),
        ];
        let tmp = path.with_extension("tar.partial");
        let out = fs::File::create(&tmp).map_err(io_ctx(format!("creating {}", tmp.display())))?;
        let mut b = tar::Builder::new(io::BufWriter::new(out));
        let ctx = || format!("writing {}", tmp.display());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_mtime(0);
        dir.set_size(0);
        b.append_data(&mut dir, format!("{layer_hex}/"), io::empty())
            .map_err(io_ctx(ctx()))?;
        let mut sorted = files;
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, data) in &sorted {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data.as_slice())
                .map_err(io_ctx(ctx()))?;
        }
        let mut w = b.into_inner().map_err(io_ctx(ctx()))?;
        w.flush().map_err(io_ctx(ctx()))?;
        drop(w);
        fs::rename(&tmp, path).map_err(io_ctx(format!(
            "renaming {} to {}",
            tmp.display(),
            path.display()
        )))?;
        let size = fs::metadata(path)
            .map_err(io_ctx(format!("stat {}", path.display())))?
            .len();
        Ok(Written {
            path: path.to_owned(),
            reference: self.reference.clone(),
            id: format!("sha256:{config_hex}"),
            diff_id,
            size,
            layer_size: layer.len() as u64,
        })
    }
}

/// `registry/name:tag` → (`registry/name`, `tag`). A `:` before the last `/` is a port.
pub fn split_reference(reference: &str) -> Result<(&str, &str), ImageError> {
    let bad = || ImageError::BadReference(reference.to_owned());
    if reference.contains('@') || reference.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    let colon = reference[slash..]
        .rfind(':')
        .map(|i| i + slash)
        .ok_or_else(bad)?;
    let (repo, tag) = (&reference[..colon], &reference[colon + 1..]);
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !tag.starts_with(['.', '-']);
    let repo_ok = !repo.is_empty()
        && repo
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c));
    if !tag_ok || !repo_ok {
        return Err(bad());
    }
    Ok((repo, tag))
}

fn check_path(dst: &str) -> Result<String, ImageError> {
    let p = Path::new(dst);
    if !p.is_absolute() || dst == "/" {
        return Err(ImageError::BadPath(dst.to_owned()));
    }
    let mut out = String::new();
    for c in p.components().skip(1) {
        match c {
            Component::Normal(n) => {
                out.push('/');
                out.push_str(
                    n.to_str()
                        .ok_or_else(|| ImageError::BadPath(dst.to_owned()))?,
                );
            }
            Component::CurDir => {}
            _ => return Err(ImageError::BadPath(dst.to_owned())),
        }
    }
    if out.is_empty() {
        return Err(ImageError::BadPath(dst.to_owned()));
    }
    Ok(out)
}

fn path_str(p: &Path) -> Result<&str, ImageError> {
    p.to_str()
        .ok_or_else(|| ImageError::BadPath(p.display().to_string()))
}

/// Lexical normalisation (`a/./b/../c` → `a/c`), for symlink targets joined onto paths.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The Go name of this machine's architecture, as image configs spell it.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests;
