//! Turning `prompt` and `messages` requests into token ids with the model's
//! `tokenizer.json` (the `tokenizers` crate) and chat template.
//!
//! - `prompt`: encoded with special tokens added (as an OpenAI completions
//!   request to vLLM).
//! - `messages`: rendered with the model's chat template, then encoded without
//!   adding special tokens (the template writes them). The template comes from
//!   `chat_template` in the model's config: a `tokenizer_config.json` (its
//!   `chat_template` string, or the entry named `default` of a list; its
//!   `bos_token`/`eos_token` are passed in) or a Jinja file. Without a
//!   configured template the built-in one renders `<|{role}|>\n{content}\n`
//!   per message and `<|assistant|>\n`. Content given as a list of parts is
//!   its `text` parts joined by newlines (as vLLM passes them to a template).
//!
//! Templates are rendered the way transformers' `apply_chat_template` renders
//! them, which is what vLLM uses: blocks trimmed (`trim_blocks`,
//! `lstrip_blocks`), Python's string, dict and list methods (`.strip()`,
//! `.split()`, `.items()`, ...), transformers' `tojson` (Python's
//! `json.dumps`: `", "` and `": "` separators, `indent`, `sort_keys`, no
//! ASCII escaping, keys in their order), `raise_exception(msg)` and
//! `strftime_now(format)`. The template sees `messages`, `tools`,
//! `add_generation_prompt` (default true), `bos_token`, `eos_token` and the
//! request's `chat_template_kwargs`. Each model's template is compiled once.
//! `router/tests/chat_templates.rs` checks all of it against transformers
//! itself, character for character, over real models' templates.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::Value;

use crate::config::ModelConfig;

mod chat;
use chat::chat_env;

/// The built-in chat template (see the module docs).
pub const DEFAULT_CHAT_TEMPLATE: &str =
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// Why a request could not be tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The request is wrong (400).
    #[error("{0}")]
    Invalid(String),
    /// The model has no tokenizer configured (400: send token_ids).
    #[error("model {0} has no tokenizer configured; send token_ids")]
    NoTokenizer(String),
    /// The configured files are unusable (500).
    #[error("{0}")]
    Setup(String),
}

struct Loaded {
    tokenizer: tokenizers::Tokenizer,
    /// The compiled chat template, as "chat".
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

/// What a chat request passes to the template besides its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// OpenAI-style `tools`, if any.
    pub tools: Option<Value>,
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs`: further variables (`enable_thinking`, ...).
    pub kwargs: serde_json::Map<String, Value>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            tools: None,
            add_generation_prompt: true,
            kwargs: serde_json::Map::new(),
        }
    }
}

impl ChatOptions {
    /// The options of an OpenAI-style chat body: `tools`,
    /// `add_generation_prompt`, `chat_template_kwargs`.
    pub fn from_body(body: &Value) -> Result<ChatOptions, String> {
        let tools = body.get("tools").filter(|t| !t.is_null()).cloned();
        if tools.as_ref().is_some_and(|t| !t.is_array()) {
            return Err("\"tools\" must be an array".into());
        }
        let add_generation_prompt = match body.get("add_generation_prompt") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("\"add_generation_prompt\" must be a boolean".into()),
        };
        let kwargs = match body.get("chat_template_kwargs") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err("\"chat_template_kwargs\" must be an object".into()),
        };
        Ok(ChatOptions {
            tools,
            add_generation_prompt,
            kwargs,
        })
    }
}

/// Tokenizers per model, loaded on first use.
pub struct Tokenizers {
    models: HashMap<String, ModelConfig>,
    loaded: RwLock<HashMap<String, Arc<Loaded>>>,
}

fn special(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

fn load_template(path: &Path) -> Result<(String, String, String), TokenizeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokenizeError::Setup(format!("reading {}: {e}", path.display())))?;
    if path.extension().is_some_and(|e| e == "json") {
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| TokenizeError::Setup(format!("{}: {e}", path.display())))?;
        let tpl = match v.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|e| e.get("template"))
                .and_then(Value::as_str)
                .unwrap_or(DEFAULT_CHAT_TEMPLATE)
                .to_string(),
            _ => DEFAULT_CHAT_TEMPLATE.to_string(),
        };
        Ok((
            tpl,
            special(v.get("bos_token")),
            special(v.get("eos_token")),
        ))
    } else {
        Ok((text, String::new(), String::new()))
    }
}

/// Flattens content parts to text, keeps role and the other keys.
fn normalize_messages(messages: &[Value]) -> Result<Vec<Value>, TokenizeError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(o) = m else {
            return Err(TokenizeError::Invalid(format!(
                "messages[{i}] must be an object"
            )));
        };
        if !o.get("role").is_some_and(Value::is_string) {
            return Err(TokenizeError::Invalid(format!(
                "messages[{i}].role must be a string"
            )));
        }
        let mut o = o.clone();
        match o.get("content") {
            Some(Value::String(_)) | Some(Value::Null) | None => {}
            Some(Value::Array(parts)) => {
                let text: Vec<&str> = parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                o.insert("content".into(), Value::String(text.join("\n")));
            }
            Some(_) => {
                return Err(TokenizeError::Invalid(format!(
                    "messages[{i}].content must be a string or a list of parts"
                )))
            }
        }
        out.push(Value::Object(o));
    }
    Ok(out)
}

impl Tokenizers {
    pub fn new(models: &[ModelConfig]) -> Self {
        Self {
            models: models.iter().map(|m| (m.name.clone(), m.clone())).collect(),
            loaded: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, model: &str) -> Result<Arc<Loaded>, TokenizeError> {
        if let Some(l) = self.loaded.read().get(model) {
            return Ok(l.clone());
        }
        let cfg = self
            .models
            .get(model)
            .ok_or_else(|| TokenizeError::NoTokenizer(model.to_string()))?;
        let path = cfg
            .tokenizer
            .as_ref()
            .ok_or_else(|| TokenizeError::NoTokenizer(model.to_string()))?;
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizeError::Setup(format!("loading {}: {e}", path.display())))?;
        let (template, bos, eos) = match &cfg.chat_template {
            Some(p) => load_template(p)?,
            None => (
                DEFAULT_CHAT_TEMPLATE.to_string(),
                String::new(),
                String::new(),
            ),
        };
        let l = Arc::new(Loaded {
            tokenizer,
            env: chat_env(template)?,
            bos,
            eos,
        });
        self.loaded.write().insert(model.to_string(), l.clone());
        Ok(l)
    }

    /// Token ids of a completion prompt.
    pub fn encode_prompt(&self, model: &str, prompt: &str) -> Result<Vec<u32>, TokenizeError> {
        let l = self.get(model)?;
        let enc = l
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| TokenizeError::Invalid(format!("tokenizing prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The chat template's rendering of `messages`.
    pub fn render_chat(
        &self,
        model: &str,
        messages: &[Value],
        options: &ChatOptions,
    ) -> Result<String, TokenizeError> {
        let l = self.get(model)?;
        let msgs = normalize_messages(messages)?;
        let tpl = l
            .env
            .get_template("chat")
            .map_err(|e| TokenizeError::Setup(format!("chat template: {e}")))?;
        // The request's kwargs first: the named variables win over them.
        let mut vars = options.kwargs.clone();
        vars.insert("messages".into(), Value::Array(msgs));
        vars.insert("tools".into(), options.tools.clone().unwrap_or(Value::Null));
        vars.insert(
            "add_generation_prompt".into(),
            Value::Bool(options.add_generation_prompt),
        );
        vars.insert("bos_token".into(), Value::String(l.bos.clone()));
        vars.insert("eos_token".into(), Value::String(l.eos.clone()));
        tpl.render(minijinja::Value::from_serialize(&vars))
            .map_err(|e| TokenizeError::Invalid(format!("rendering messages: {e}")))
    }

    /// Token ids of a chat request.
    pub fn encode_messages(
        &self,
        model: &str,
        messages: &[Value],
        options: &ChatOptions,
    ) -> Result<Vec<u32>, TokenizeError> {
        let text = self.render_chat(model, messages, options)?;
        let l = self.get(model)?;
        let enc = l
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| TokenizeError::Invalid(format!("tokenizing messages: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// Writes a small WordLevel `tokenizer.json` (whitespace pre-tokenizer) over
/// `words`, ids in order, `[UNK]` last. For tests and examples.
pub fn write_word_level_tokenizer(path: &Path, words: &[&str]) -> std::io::Result<()> {
    let mut vocab = serde_json::Map::new();
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).to_string(), Value::from(i as u64));
    }
    vocab.insert("[UNK]".into(), Value::from(words.len() as u64));
    let j = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(path, j.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_and_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("tokenizer.json");
        write_word_level_tokenizer(
            &p,
            &["hello", "world", "<|user|>", "<|assistant|>", "<", "|", ">"],
        )
        .expect("write");
        let t = Tokenizers::new(&[ModelConfig {
            name: "m".into(),
            tokenizer: Some(p),
            ..ModelConfig::default()
        }]);
        assert_eq!(t.encode_prompt("m", "hello world").ok(), Some(vec![0, 1]));
        assert!(matches!(
            t.encode_prompt("x", "hi"),
            Err(TokenizeError::NoTokenizer(_))
        ));
        let msgs = vec![
            serde_json::json!({"role": "user", "content": [{"type": "text", "text": "hello"}]}),
        ];
        let text = t
            .render_chat("m", &msgs, &ChatOptions::default())
            .expect("render");
        assert_eq!(text, "<|user|>\nhello\n<|assistant|>\n");
        let ids = t
            .encode_messages("m", &msgs, &ChatOptions::default())
            .expect("encode");
        assert!(ids.contains(&0));
        assert!(matches!(
            t.encode_messages("m", &[serde_json::json!(3)], &ChatOptions::default()),
            Err(TokenizeError::Invalid(_))
        ));
    }

    #[test]
    fn template_from_tokenizer_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("tokenizer.json");
        write_word_level_tokenizer(&p, &["a", "b"]).expect("write");
        let c = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &c,
            r#"{"bos_token": {"content": "B"}, "chat_template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no') }}{% endif %}[{{ m.content }}]{% endfor %}"}"#,
        )
        .expect("write");
        let t = Tokenizers::new(&[ModelConfig {
            name: "m".into(),
            tokenizer: Some(p),
            chat_template: Some(c),
            kv_group: 0,
        }]);
        let r = t.render_chat(
            "m",
            &[serde_json::json!({"role": "user", "content": "a"})],
            &ChatOptions::default(),
        );
        assert_eq!(r.ok().as_deref(), Some("B[a]"));
        assert!(matches!(
            t.render_chat(
                "m",
                &[serde_json::json!({"role": "bad", "content": "a"})],
                &ChatOptions::default()
            ),
            Err(TokenizeError::Invalid(_))
        ));
    }
}
