use std::os::unix::fs::symlink;

use super::inspect::{LayerEntry, inspect};
use super::*;

fn sample() -> Image {
    let mut img = Image::new("ghcr.io/remora-mesh/sample:0.1.0")
        .expect("reference")
        .entrypoint(["/usr/local/bin/app"])
        .cmd(["serve", "--port=8080"])
        .user("65532:65532")
        .env("RUST_LOG", "info")
        .workdir("/");
    img.bytes("/usr/local/bin/app", b"#!/bin/true\n".to_vec(), 0o755)
        .expect("file");
    img.bytes(
        "/etc/passwd",
        b"root:x:0:0:root:/:/sbin/nologin\n".to_vec(),
        0o644,
    )
    .expect("file");
    img.symlink("/usr/local/bin/app-link", "app").expect("link");
    img.dir("/tmp", 0o1777).expect("dir");
    img
}

#[test]
fn the_archive_has_the_docker_save_layout_and_consistent_digests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sample.tar");
    let written = sample().write(&path).expect("write");
    let got = inspect(&path).expect("inspect");

    let layer_hex = written.diff_id.trim_start_matches("sha256:");
    let config_hex = written.id.trim_start_matches("sha256:");
    assert_eq!(
        got.members,
        vec![
            format!("{layer_hex}/"),
            format!("{config_hex}.json"),
            format!("{layer_hex}/VERSION"),
            format!("{layer_hex}/layer.tar"),
            "manifest.json".to_owned(),
            "repositories".to_owned(),
        ]
        .into_iter()
        .collect::<Vec<_>>()
        .tap_sort_after_first()
    );
    assert_eq!(got.id, written.id);
    assert_eq!(got.repo_tags, vec!["ghcr.io/remora-mesh/sample:0.1.0"]);
    assert_eq!(got.config["os"], "linux");
    assert_eq!(got.config["architecture"], go_arch());
    assert_eq!(got.config["rootfs"]["diff_ids"][0], written.diff_id);
    let c = &got.config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/app"]));
    assert_eq!(c["Cmd"], serde_json::json!(["serve", "--port=8080"]));
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(c["WorkingDir"], "/");
    assert_eq!(c["Env"], serde_json::json!([DEFAULT_PATH, "RUST_LOG=info"]));

    // Sorted, parents explicit, fixed metadata.
    assert_eq!(
        got.layer_order,
        [
            "etc",
            "etc/passwd",
            "tmp",
            "usr",
            "usr/local",
            "usr/local/bin",
            "usr/local/bin/app",
            "usr/local/bin/app-link"
        ]
    );
    assert!(
        got.nondeterministic.is_empty(),
        "{:?}",
        got.nondeterministic
    );
    assert_eq!(got.layer["tmp"], LayerEntry::Dir { mode: 0o1777 });
    assert_eq!(got.layer["usr/local"], LayerEntry::Dir { mode: 0o755 });
    assert_eq!(
        got.layer["usr/local/bin/app"],
        LayerEntry::File {
            mode: 0o755,
            data: b"#!/bin/true\n".to_vec()
        }
    );
    assert_eq!(
        got.layer["usr/local/bin/app-link"],
        LayerEntry::Symlink {
            target: "app".into()
        }
    );
    assert_eq!(
        got.resolve("/usr/local/bin/app-link").map(|(k, _)| k),
        Some("usr/local/bin/app")
    );

    let repos: serde_json::Value = {
        let f = fs::File::open(&path).expect("open");
        let mut a = tar::Archive::new(f);
        let mut e = a
            .entries()
            .expect("entries")
            .filter_map(Result::ok)
            .find(|e| {
                e.path()
                    .map(|p| p.to_string_lossy() == "repositories")
                    .unwrap_or(false)
            })
            .expect("repositories member");
        let mut s = String::new();
        io::Read::read_to_string(&mut e, &mut s).expect("read");
        serde_json::from_str(&s).expect("json")
    };
    assert_eq!(repos["ghcr.io/remora-mesh/sample"]["0.1.0"], layer_hex);
    assert_eq!(written.size, fs::metadata(&path).expect("stat").len());
}

/// The member order is: the layer directory first, then the files sorted by name.
trait SortAfterFirst {
    fn tap_sort_after_first(self) -> Self;
}
impl SortAfterFirst for Vec<String> {
    fn tap_sort_after_first(mut self) -> Self {
        self[1..].sort();
        self
    }
}

#[test]
fn output_is_byte_for_byte_deterministic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = sample().write(&dir.path().join("a.tar")).expect("a");
    let b = sample().write(&dir.path().join("b.tar")).expect("b");
    assert_eq!(a.id, b.id);
    let (ba, bb) = (
        fs::read(&a.path).expect("read a"),
        fs::read(&b.path).expect("read b"),
    );
    assert!(ba == bb, "two writes of the same image differ");
}

#[test]
fn bad_references_are_refused() {
    for bad in [
        "noTag",
        "repo:latest",
        "Repo/Upper:1",
        "repo:",
        "repo:-x",
        "a b:1",
        "repo@sha256:00",
    ] {
        assert!(
            matches!(Image::new(bad), Err(ImageError::BadReference(_))),
            "{bad} was accepted"
        );
    }
    assert_eq!(
        split_reference("localhost:5000/remora/proxy:0.1.0").expect("port"),
        ("localhost:5000/remora/proxy", "0.1.0")
    );
    assert!(Image::new("remora-demo-app:0.1.0").is_ok());
}

#[test]
fn bad_paths_and_conflicts_are_refused() {
    let mut img = sample();
    for bad in ["relative/file", "/", "/etc/../passwd", ""] {
        assert!(
            matches!(
                img.bytes(bad, Vec::new(), 0o644),
                Err(ImageError::BadPath(_))
            ),
            "{bad:?} was accepted"
        );
    }
    // The same contents twice is fine (two binaries needing libc); different is not.
    img.bytes(
        "/etc/passwd",
        b"root:x:0:0:root:/:/sbin/nologin\n".to_vec(),
        0o644,
    )
    .expect("identical duplicate");
    let err = img
        .bytes("/etc/passwd", b"other\n".to_vec(), 0o644)
        .expect_err("conflict");
    assert!(err.to_string().contains("/etc/passwd"), "{err}");
    // A file under a path that is a file.
    assert!(matches!(
        img.bytes("/etc/passwd/x", Vec::new(), 0o644),
        Err(ImageError::Conflict { .. })
    ));
}

#[test]
fn host_paths_keep_symlinked_ancestors_and_sonames() {
    // A merged-/usr layout in miniature: lib -> usr/lib, libfoo.so.1 -> libfoo.so.1.2.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = fs::canonicalize(dir.path()).expect("canonical tempdir");
    fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
    fs::write(root.join("usr/lib/libfoo.so.1.2"), b"ELF").expect("write");
    symlink("libfoo.so.1.2", root.join("usr/lib/libfoo.so.1")).expect("soname link");
    symlink("usr/lib", root.join("lib")).expect("lib link");

    let mut img = Image::new("example.com/t:1").expect("reference");
    img.host_path(&root.join("lib/libfoo.so.1"))
        .expect("host path");
    let r = root.to_str().expect("utf-8 tempdir");
    let e = img.entries();
    assert_eq!(
        e[&format!("{r}/lib")],
        Entry::Symlink {
            target: "usr/lib".into()
        }
    );
    assert_eq!(
        e[&format!("{r}/usr/lib/libfoo.so.1")],
        Entry::Symlink {
            target: "libfoo.so.1.2".into()
        }
    );
    assert!(
        matches!(&e[&format!("{r}/usr/lib/libfoo.so.1.2")], Entry::File { data, .. } if data == b"ELF")
    );

    // And the written image resolves the loader's path to the file.
    let path = root.join("t.tar");
    img.write(&path).expect("write");
    let got = inspect(&path).expect("inspect");
    let (resolved, entry) = got
        .resolve(&format!("{r}/lib/libfoo.so.1"))
        .expect("resolves");
    assert_eq!(resolved, format!("{}/usr/lib/libfoo.so.1.2", &r[1..]));
    assert!(matches!(entry, LayerEntry::File { .. }));

    assert!(matches!(
        img.host_path(&root.join("no/such/file")),
        Err(ImageError::Io { .. })
    ));
}

#[test]
fn a_corrupted_layer_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.tar");
    sample().write(&path).expect("write");
    let mut bytes = fs::read(&path).expect("read");
    // Flip a byte of the app's contents inside the layer.
    let pos = bytes
        .windows(11)
        .position(|w| w == b"#!/bin/true")
        .expect("app contents in the archive");
    bytes[pos] = b'?';
    fs::write(&path, &bytes).expect("write back");
    let err = inspect(&path).expect_err("digest mismatch");
    assert!(err.to_string().contains("diff_ids"), "{err}");
}
