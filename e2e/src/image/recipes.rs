//! Remora's images, assembled from the workspace's release binaries: each holds its
//! binary in `/usr/local/bin`, the shared libraries and loader it needs, `/etc/passwd`
//! and `/etc/group` naming the users the manifests run as, and `/tmp`. `remora-init`
//! also carries the host's iptables (both the nf_tables and the legacy multi-call binary,
//! their program links, libraries and xtables extensions), because it runs
//! `iptables-{nft,legacy}-{save,restore}` for whichever backend the pod uses.
//! `remora-accel`, the optional socket accelerator's node agent ([`OPTIONAL`]), is built
//! by `make images` too but is not part of `config/default`.
//!
//! The references are `<registry>/<name>:<tag>`, by default what `config/` and the
//! webhook's defaults name: `ghcr.io/remora-mesh/<name>:<workspace version>`.

use std::fs;
use std::path::{Path, PathBuf};

use super::deps::{add_binary, add_libraries_of, shared_libraries};
use super::{Image, ImageError};

/// The registry part of the default references.
pub const DEFAULT_REGISTRY: &str = "ghcr.io/remora-mesh";

/// The default tag: the workspace version, as the webhook's defaults use.
pub const DEFAULT_TAG: &str = env!("CARGO_PKG_VERSION");

/// Every image this module builds, by binary name.
pub const COMPONENTS: [&str; 5] = [
    "remora-operator",
    "remora-webhook",
    "remora-proxy",
    "remora-init",
    "remora-demo-app",
];

/// Images of optional components (`config/accel`), built beside [`COMPONENTS`] but not
/// installed by `config/default`.
pub const OPTIONAL: [&str; 1] = ["remora-accel"];

/// Every image this module builds: [`COMPONENTS`], then [`OPTIONAL`].
pub fn all_images() -> impl Iterator<Item = &'static str> {
    COMPONENTS.into_iter().chain(OPTIONAL)
}

/// The uid (and gid) of the proxy: the init container's rules exempt its traffic. It must
/// equal the webhook's `PROXY_UID`.
pub const PROXY_UID: u32 = 1337;

/// The unprivileged uid of the operator, webhook and demo app (as distroless' `nonroot`).
pub const NONROOT_UID: u32 = 65532;

const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                      remora-proxy:x:1337:1337:remora-proxy:/nonexistent:/sbin/nologin\n\
                      nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nremora-proxy:x:1337:\nnonroot:x:65532:\n";

/// Host directories where the iptables programs may live.
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// `registry/name:tag`.
pub fn reference(registry: &str, name: &str, tag: &str) -> String {
    format!("{}/{name}:{tag}", registry.trim_end_matches('/'))
}

/// The image of `name` (one of [`COMPONENTS`]) from the binaries in `bin_dir`.
pub fn recipe(name: &str, bin_dir: &Path, reference: &str) -> Result<Image, ImageError> {
    let bin = bin_dir.join(name);
    let dst = format!("/usr/local/bin/{name}");
    let (user, cmd): (u32, &[&str]) = match name {
        "remora-operator" | "remora-webhook" => (NONROOT_UID, &[]),
        "remora-proxy" => (PROXY_UID, &[]),
        // Root with NET_ADMIN/NET_RAW only: the webhook's securityContext.
        "remora-init" => (0, &[]),
        "remora-demo-app" => (NONROOT_UID, &["serve"]),
        // Root, with CAP_BPF and CAP_NET_ADMIN only (config/accel's securityContext):
        // Kubernetes gives added capabilities to a non-root process only through file
        // capabilities on its binary (a security.capability xattr, as setcap writes), which
        // this image writer does not set; it has no ambient capabilities.
        "remora-accel" => (0, &[]),
        other => {
            return Err(ImageError::Missing {
                what: format!("an image recipe for '{other}'"),
                how: format!(
                    "choose one of {}",
                    all_images().collect::<Vec<_>>().join(", ")
                ),
            });
        }
    };
    let mut image = Image::new(reference)?
        .entrypoint([dst.clone()])
        .cmd(cmd.iter().copied())
        .user(format!("{user}:{user}"))
        .workdir("/");
    base(&mut image)?;
    add_binary(&mut image, &bin, &dst)?;
    if name == "remora-init" {
        add_iptables(&mut image)?;
        // The legacy backend's tools take a lock file, by default /run/xtables.lock,
        // which cannot be created on the init container's read-only root filesystem
        // ("Fatal: can't open lock file"); /dev/shm is a writable tmpfs in every pod, and
        // only this container runs iptables in the pod's network namespace.
        image = image.env("XTABLES_LOCKFILE", "/dev/shm/xtables.lock");
    }
    Ok(image)
}

fn base(image: &mut Image) -> Result<(), ImageError> {
    image.bytes("/etc/passwd", PASSWD, 0o644)?;
    image.bytes("/etc/group", GROUP, 0o644)?;
    image.dir("/tmp", 0o1777)?;
    Ok(())
}

/// The host's iptables: `xtables-nft-multi` and `xtables-legacy-multi`, every program
/// link remora-init (or a person debugging the pod) calls, their libraries, and the
/// extension modules that `-m owner`, `-j REDIRECT`, ... load at run time.
pub fn add_iptables(image: &mut Image) -> Result<(), ImageError> {
    let missing = |what: &str| ImageError::Missing {
        what: what.to_owned(),
        how: "install iptables on the build host: apt-get install -y iptables".into(),
    };
    let mut multis = Vec::new();
    for multi in ["xtables-nft-multi", "xtables-legacy-multi"] {
        let path = find_program(multi).ok_or_else(|| missing(multi))?;
        multis.push(path);
    }
    for family in ["iptables", "ip6tables"] {
        for backend in ["", "-nft", "-legacy"] {
            for op in ["", "-save", "-restore"] {
                let prog = format!("{family}{backend}{op}");
                match find_program(&prog) {
                    Some(p) => {
                        image.host_path(&p)?;
                    }
                    // The plain names are conveniences; the backend-specific ones are
                    // what remora-init runs.
                    None if backend.is_empty() => {}
                    None => return Err(missing(&prog)),
                }
            }
        }
    }
    let mut xtables_dir = None;
    for multi in &multis {
        image.host_path(multi)?;
        for lib in shared_libraries(multi)? {
            image.host_path(&lib)?;
            if lib
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libxtables.so"))
            {
                xtables_dir = lib.parent().map(|d| d.join("xtables"));
            }
        }
    }
    let dir = xtables_dir
        .filter(|d| d.is_dir())
        .or_else(|| {
            [
                "/usr/lib/x86_64-linux-gnu/xtables",
                "/usr/lib64/xtables",
                "/usr/lib/xtables",
            ]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
        })
        .ok_or_else(|| missing("the xtables extension directory (libxt_*.so)"))?;
    let mut modules: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(super::io_ctx(format!("listing {}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    modules.sort();
    if modules.is_empty() {
        return Err(missing(&format!("xtables extensions in {}", dir.display())));
    }
    for module in &modules {
        image.host_path(module)?;
        add_libraries_of(image, module)?;
    }
    // Protocol names for `-p tcp` when libxtables asks the C library first.
    if Path::new("/etc/protocols").is_file() {
        image.host_path(Path::new("/etc/protocols"))?;
    }
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    SBIN_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| fs::symlink_metadata(p).is_ok() && p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::deps::interpreter;
    use crate::image::inspect::{LayerEntry, inspect};

    /// A stand-in for a release binary: this test executable (dynamically linked, like
    /// the real ones), copied under the component's name.
    fn fake_bin_dir(name: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("current exe");
        fs::copy(&exe, dir.path().join(name)).expect("copy test binary");
        dir
    }

    fn assert_runnable(got: &crate::image::inspect::Inspected, binary: &str, host_binary: &Path) {
        let (_, entry) = got
            .resolve(binary)
            .unwrap_or_else(|| panic!("{binary} missing"));
        assert!(
            matches!(entry, LayerEntry::File { mode, .. } if mode & 0o111 != 0),
            "{binary} not executable"
        );
        let interp = interpreter(host_binary)
            .expect("ELF")
            .expect("dynamically linked");
        let (_, loader) = got
            .resolve(interp.to_str().expect("utf-8"))
            .unwrap_or_else(|| panic!("loader {} missing", interp.display()));
        assert!(matches!(loader, LayerEntry::File { .. }));
        for lib in shared_libraries(host_binary).expect("ldd") {
            let p = lib.to_str().expect("utf-8");
            assert!(got.resolve(p).is_some(), "library {p} of {binary} missing");
        }
    }

    /// Writes the image of `name` under its default reference from a stand-in binary and
    /// checks what every image has: that reference, `user`, its binary as the entrypoint,
    /// runnable with its libraries and loader.
    fn written_with_defaults(name: &str, user: &str) -> crate::image::inspect::Inspected {
        let bins = fake_bin_dir(name);
        let out = tempfile::tempdir().expect("tempdir");
        let r = reference(DEFAULT_REGISTRY, name, DEFAULT_TAG);
        let path = out.path().join(format!("{name}.tar"));
        recipe(name, bins.path(), &r)
            .expect("recipe")
            .write(&path)
            .expect("write");
        let got = inspect(&path).expect("inspect");
        assert_eq!(
            got.repo_tags,
            vec![format!("ghcr.io/remora-mesh/{name}:{DEFAULT_TAG}")]
        );
        assert_eq!(got.config["config"]["User"], user);
        let binary = format!("/usr/local/bin/{name}");
        assert_eq!(got.config["config"]["Entrypoint"][0], binary.as_str());
        assert_runnable(&got, &binary, &bins.path().join(name));
        got
    }

    #[test]
    fn the_proxy_image_holds_the_binary_its_libraries_and_the_loader() {
        let got = written_with_defaults("remora-proxy", "1337:1337");
        let Some((_, LayerEntry::File { data, .. })) = got.resolve("/etc/passwd") else {
            panic!("no /etc/passwd");
        };
        assert!(String::from_utf8_lossy(data).contains(":1337:1337:"));
    }

    #[test]
    fn the_init_image_carries_both_iptables_backends_and_their_extensions() {
        assert!(
            find_program("xtables-nft-multi").is_some(),
            "this test needs the host's iptables: apt-get install -y iptables"
        );
        let bins = fake_bin_dir("remora-init");
        let out = tempfile::tempdir().expect("tempdir");
        let image =
            recipe("remora-init", bins.path(), "example.com/remora-init:1").expect("recipe");
        let path = out.path().join("remora-init.tar");
        image.write(&path).expect("write");
        let got = inspect(&path).expect("inspect");
        assert_eq!(got.config["config"]["User"], "0:0");
        let env = &got.config["config"]["Env"];
        assert!(
            env.as_array().is_some_and(|e| e
                .iter()
                .any(|v| v == "XTABLES_LOCKFILE=/dev/shm/xtables.lock")),
            "{env}"
        );
        for prog in [
            "iptables-nft-restore",
            "iptables-nft-save",
            "ip6tables-legacy-restore",
            "ip6tables-legacy-save",
        ] {
            let host = find_program(prog).expect("host program");
            let in_image = format!("{}", host.display());
            let (resolved, _) = got
                .resolve(&in_image)
                .unwrap_or_else(|| panic!("{prog} missing"));
            assert!(
                resolved.ends_with("-multi"),
                "{prog} resolves to {resolved}"
            );
            assert_runnable(&got, &in_image, &host);
        }
        for ext in [
            "libxt_owner.so",
            "libxt_REDIRECT.so",
            "libxt_tcp.so",
            "libxt_mark.so",
        ] {
            assert!(
                got.layer
                    .keys()
                    .any(|k| k.ends_with(&format!("xtables/{ext}"))),
                "extension {ext} missing"
            );
        }
    }

    #[test]
    fn the_accel_image_is_its_binary_and_libraries_run_as_root_without_a_shell() {
        let got = written_with_defaults("remora-accel", "0:0");
        for absent in ["/bin/sh", "/usr/bin/sh", "/usr/sbin/iptables"] {
            assert!(got.resolve(absent).is_none(), "{absent} in the image");
        }
        assert!(all_images().any(|n| n == "remora-accel"));
        assert!(
            !COMPONENTS.contains(&"remora-accel"),
            "not in config/default"
        );
    }

    #[test]
    fn an_unknown_component_or_a_missing_binary_is_a_clear_error() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = recipe("remora-nope", empty.path(), "example.com/x:1").expect_err("unknown");
        assert!(err.to_string().contains("remora-operator"), "{err}");
        assert!(err.to_string().contains("remora-accel"), "{err}");
        let err =
            recipe("remora-operator", empty.path(), "example.com/x:1").expect_err("no binary");
        assert!(err.to_string().contains("make images"), "{err}");
    }
}
