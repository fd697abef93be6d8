//! README's first command, exactly as written there, run against the tiny model: a newcomer's
//! first step works on a fresh clone (the sketch it names ships in examples/).

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Splits a shell command line into words (double and single quotes, no expansions).
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// The first `cargo run ... -- animate ...` line of README.md.
fn first_command() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    readme
        .lines()
        .find(|l| l.starts_with("cargo run") && l.contains(" -- animate "))
        .expect("README.md has an animate command")
        .to_string()
}

#[test]
fn readme_first_command_runs_on_the_tiny_model() {
    let line = first_command();
    let words = shell_words(&line);
    let dashes = words.iter().position(|w| w == "--").unwrap();
    assert_eq!(
        words[..dashes],
        ["cargo", "run", "--release", "-p", "flipsketch-cli"],
        "{line}"
    );
    let args = &words[dashes + 1..];
    // The sketch it names exists in the repository.
    let sketch = args
        .iter()
        .position(|a| a == "--sketch")
        .map(|i| &args[i + 1])
        .expect("--sketch");
    assert!(
        root().join(sketch).is_file(),
        "{sketch} is not in the repository"
    );
    // Run from a folder laid out like the repository's root (its examples/), so that the
    // relative path resolves and the default output folder lands in the temporary folder.
    let work = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root().join("examples"), work.path().join("examples")).unwrap();
    let tiny = root().join("tests/fixtures/tiny");
    let out = Command::new(env!("CARGO_BIN_EXE_flipsketch"))
        .current_dir(work.path())
        .args(args)
        .arg("--model")
        .arg(&tiny)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{line}\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stem = std::path::Path::new(sketch)
        .file_stem()
        .unwrap()
        .to_string_lossy();
    let folder = work.path().join(format!("{stem}-flipsketch"));
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("result.json")).unwrap())
            .unwrap();
    assert_eq!(result["variants"], 3);
    assert_eq!(result["frames"], 10);
    for k in 0..3 {
        let gif = folder.join(format!("variant-{k}.gif"));
        assert!(
            stdout.contains(&gif.file_name().unwrap().to_string_lossy().to_string()),
            "{stdout}"
        );
        let bytes = std::fs::read(&gif).unwrap();
        assert!(bytes.starts_with(b"GIF8"));
    }
}

#[test]
fn shell_words_splits_like_sh() {
    assert_eq!(
        shell_words(r#"a --prompt "the cat yawns" 'x y' z"#),
        ["a", "--prompt", "the cat yawns", "x y", "z"]
    );
    assert_eq!(shell_words(r#"--p """#), ["--p", ""]);
}
