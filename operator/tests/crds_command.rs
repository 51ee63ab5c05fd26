//! `llmops-operator crds` prints exactly the checked-in CRDs and can rewrite them.

use std::path::PathBuf;
use std::process::Command;

fn manifests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/manifests")
}

#[test]
fn prints_every_checked_in_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_llmops-operator")).arg("crds").output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let mut names: Vec<_> =
        std::fs::read_dir(manifests_dir()).expect("manifests").map(|e| e.expect("entry").path()).collect();
    names.sort();
    assert_eq!(names.len(), 5);
    for path in names {
        let file = std::fs::read_to_string(&path).expect("read");
        assert!(printed.contains(&file), "{} is not what `crds` prints", path.display());
    }
    assert_eq!(printed.matches("\n---\n").count(), 4);
    for kind in ["Dataset", "FineTuneJob", "PromptVersion", "ModelDeployment", "EvalRun"] {
        assert!(printed.contains(&format!("kind: {kind}\n")), "{kind}");
    }
}

#[test]
fn write_produces_the_checked_in_files() {
    let dir = std::env::temp_dir().join(format!("llmops-crds-{}", std::process::id()));
    let out =
        Command::new(env!("CARGO_BIN_EXE_llmops-operator")).args(["crds", "--write"]).arg(&dir).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for entry in std::fs::read_dir(manifests_dir()).expect("manifests") {
        let path = entry.expect("entry").path();
        let written = std::fs::read_to_string(dir.join(path.file_name().expect("name"))).expect("written");
        assert_eq!(written, std::fs::read_to_string(&path).expect("read"), "{}", path.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}
