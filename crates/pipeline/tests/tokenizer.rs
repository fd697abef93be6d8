//! Tokenizer ids against transformers' slow `CLIPTokenizer` (what the app ran) for every prompt
//! of tests/fixtures/golden/tokenizer.json: exact equality, all 77 ids.

use std::path::PathBuf;

use flipsketch_pipeline::text::ClipTokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn ids_match_transformers_clip_tokenizer() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("tiny/tokenizer")).unwrap();
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.pad_id(), 0);
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let prompts = g["prompts"].as_array().unwrap();
    let want = g["input_ids"].as_array().unwrap();
    assert!(prompts.len() >= 40);
    let mut failures = Vec::new();
    for (i, (p, w)) in prompts.iter().zip(want).enumerate() {
        let p = p.as_str().unwrap();
        let w: Vec<u32> = w
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(p).unwrap();
        if got != w {
            failures.push(format!("prompt {i} {p:?}:\n  got  {got:?}\n  want {w:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ:\n{}",
        failures.len(),
        prompts.len(),
        failures.join("\n")
    );
}

#[test]
fn pad_token_in_prompt_is_id_zero() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("tiny/tokenizer")).unwrap();
    let ids = tok.encode("hello!").unwrap();
    assert_eq!(&ids[..4], &[49406, 3306, 0, 49407]);
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::copy(
        fixtures().join("tiny/tokenizer/vocab.json"),
        dir.path().join("vocab.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("merges.txt"), "{err}");
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let err = ClipTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("merges.txt") && err.contains("line 2"),
        "{err}"
    );
}
