//! The router's chat rendering against transformers' own
//! `apply_chat_template` (what vLLM renders a chat request with), character
//! for character and token for token, over real models' chat templates
//! (`fixtures/chat_templates/`, from their published `tokenizer_config.json`)
//! and many message lists: system prompts, trimming, multi-turn, tools and
//! tool calls, reasoning split with Python string methods, template
//! kwargs, the date helper, templates that raise. Needs `KVTIER_PYTHON`.

mod ingest_util;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ingest_util::{python_with_vllm, script};
use kvrouter::config::ModelConfig;
use kvrouter::tokenize::{write_word_level_tokenizer, ChatOptions, Tokenizers};
use serde_json::{json, Value};

const TEMPLATES: [&str; 8] = [
    "llama3",
    "llama32_tools",
    "qwen25",
    "qwen3_thinking",
    "mistral",
    "gemma",
    "phi3",
    "zephyr",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_templates")
        .join(format!("{name}.json"))
}

fn tools() -> Value {
    // Keys deliberately not in alphabetical order: tojson keeps theirs.
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city — «ünïcode» <b>&amp;</b>",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "e.g. \"Paris\"\nor Zürich"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7.5}
                },
                "required": ["city"]
            }
        }
    }])
}

/// (messages, tools, add_generation_prompt, kwargs)
fn conversations() -> Vec<(Value, Option<Value>, bool, Value)> {
    let call = json!({"role": "assistant", "content": "", "tool_calls": [{
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
    }]});
    let result = json!({"role": "tool", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"});
    vec![
        (
            json!([{"role": "user", "content": "Hello"}]),
            None,
            true,
            json!({}),
        ),
        (
            json!([{"role": "system", "content": "  You are terse.\n"},
                   {"role": "user", "content": " What is 2+2?  \n"}]),
            None,
            true,
            json!({}),
        ),
        (
            json!([{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke."}]),
            None,
            false,
            json!({}),
        ),
        (
            json!([{"role": "user", "content": "Weather in Paris?"}]),
            Some(tools()),
            true,
            json!({}),
        ),
        (
            json!([{"role": "system", "content": "Use tools."},
                   {"role": "user", "content": "Weather in Paris?"}, call, result]),
            Some(tools()),
            true,
            json!({}),
        ),
        (
            json!([{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                   {"role": "user", "content": "and 3+3?"}]),
            None,
            true,
            json!({"enable_thinking": false}),
        ),
        (
            json!([{"role": "user", "content": "Date?"}]),
            Some(tools()),
            true,
            json!({"tools_in_user_message": false}),
        ),
        (
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            None,
            true,
            json!({}),
        ),
    ]
}

/// A word-level `tokenizer.json` whose models' control tokens are special
/// added tokens, as in the models' own tokenizers: both sides split them out
/// before the words.
fn special_tokenizer(path: &std::path::Path) {
    let specials = [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|im_start|>",
        "<|im_end|>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "<bos>",
        "<eos>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
        "<|endoftext|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ];
    let words = [
        "Hello",
        "Hi",
        "Paris",
        "user",
        "assistant",
        "system",
        "the",
        "?",
    ];
    let mut vocab = serde_json::Map::new();
    for (i, w) in words.iter().chain(specials.iter()).enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    vocab.insert("[UNK]".into(), json!(vocab.len()));
    let added: Vec<Value> = specials
        .iter()
        .map(|s| {
            json!({"id": vocab[*s], "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let j = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(path, j.to_string()).unwrap();
}

#[test]
fn renders_as_transformers_does() {
    let Some(python) = python_with_vllm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    special_tokenizer(&tok_path);
    let models: Vec<ModelConfig> = TEMPLATES
        .iter()
        .map(|t| ModelConfig {
            name: t.to_string(),
            tokenizer: Some(tok_path.clone()),
            chat_template: Some(fixture(t)),
            ..ModelConfig::default()
        })
        .collect();
    let tokenizers = Tokenizers::new(&models);
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for t in TEMPLATES {
        for (messages, tools, agp, kwargs) in conversations() {
            let options = ChatOptions {
                tools: tools.clone(),
                add_generation_prompt: agp,
                kwargs: kwargs.as_object().unwrap().clone(),
            };
            let list = messages.as_array().unwrap().clone();
            let text = tokenizers.render_chat(t, &list, &options);
            let ids = tokenizers.encode_messages(t, &list, &options);
            ours.push((t, messages.clone(), text, ids));
            cases.push(json!({
                "tokenizer": tok_path, "config": fixture(t), "messages": messages,
                "tools": tools, "add_generation_prompt": agp, "kwargs": kwargs,
            }));
        }
    }
    let mut child = Command::new(&python)
        .arg(script("chat_render.py"))
        .env("TZ", "UTC")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_vec(&cases).unwrap().as_slice())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "chat_render.py failed");
    let theirs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs.len(), ours.len());
    let (mut rendered, mut raised) = (0, 0);
    for ((t, messages, text, ids), want) in ours.into_iter().zip(theirs) {
        match (want.get("text").and_then(Value::as_str), text) {
            (Some(want_text), Ok(text)) => {
                assert_eq!(text, want_text, "{t}: {messages}");
                let want_ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
                assert_eq!(ids.unwrap(), want_ids, "{t}: {messages}");
                rendered += 1;
            }
            (None, Err(_)) => raised += 1,
            (Some(_), Err(e)) => panic!("{t}: {messages}: transformers renders it, we fail: {e}"),
            (None, Ok(text)) => panic!(
                "{t}: {messages}: transformers fails ({}), we render {text:?}",
                want["error"]
            ),
        }
    }
    // Most cases render; the templates that refuse systems or unalternating
    // roles raise, in both.
    assert!(
        rendered >= 40 && raised >= 4,
        "{rendered} rendered, {raised} raised"
    );
}

#[test]
fn content_parts_are_joined_by_newlines_as_vllm_does() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    write_word_level_tokenizer(&tok_path, &["a"]).unwrap();
    let t = Tokenizers::new(&[ModelConfig {
        name: "m".into(),
        tokenizer: Some(tok_path),
        ..ModelConfig::default()
    }]);
    let messages = json!([{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "two"}]}]);
    let text = t
        .render_chat("m", messages.as_array().unwrap(), &ChatOptions::default())
        .unwrap();
    assert_eq!(text, "<|user|>\none\ntwo\n<|assistant|>\n");
}
