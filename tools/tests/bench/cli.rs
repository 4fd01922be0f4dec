//! `kvdex bench …` and `kvdex gen-synth` refuse bad input by name, through the `kvdex`
//! binary (which runs `kvdex-bench`), never with a panic or a backtrace.

use crate::kvdex;

#[test]
fn cli_errors_name_what_is_wrong_and_never_panic() {
    let file = std::env::temp_dir().join(format!("kvdex-cli-file-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let out_flag = file.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "gen-synth",
                "--tokens",
                "300",
                "--layers",
                "1",
                "--out",
                out_flag,
            ],
            "cannot create the directory",
        ),
        (
            &["bench", "decode", "--context", "100"],
            "context 100 leaves no token to retrieve",
        ),
        (
            &["bench", "decode", "--steps", "0"],
            "--steps must be at least 1",
        ),
        (
            &["bench", "decode", "--q-heads", "0", "--context", "1000"],
            "all non-zero",
        ),
        (
            &["bench", "recall", "--data", "/nonexistent-kvdex-dir"],
            "/nonexistent-kvdex-dir/meta.json",
        ),
    ];
    for (args, want) in cases {
        let out = kvdex()
            .args(*args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(
        kvdex()
            .args(["gen-synth", "--out", out_flag])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).contains(out_flag))
            .unwrap_or(false),
        "the error names the path"
    );
    std::fs::remove_file(&file).ok();
}

#[test]
fn cli_errors_print_no_backtrace_even_when_one_is_asked_for() {
    // RUST_BACKTRACE=1 (set on many developer machines) made every CLI error end in a stack
    // trace of `main`, anyhow's `Debug`.
    let out = kvdex()
        .args(["bench", "decode", "--steps", "0"])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.ends_with("Error: config: --steps must be at least 1\n"),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}
