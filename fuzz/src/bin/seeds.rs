//! Writes the seed inputs of every fuzz target into `<corpus>/<target>/seed-*`: small
//! valid examples of each input (the tiny GGUF model, the example Assignments in YAML,
//! JSON and wire form, Parquet, compressed JSONL, traffic logs, OpenAI requests, chat
//! templates) from which the fuzzers mutate. Run as `seeds <corpus directory>`.

// Built with the targets' coverage instrumentation, whose runtime libFuzzer provides.
extern crate libfuzzer_sys;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int32Array, LargeStringArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Fields};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use prost::Message;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    Ok(())
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

const CHAT_JSONL: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
{"conv": "[{\"role\": \"user\", \"content\": \"hi\"}]", "sys": "be kind", "body": 7}
{"prompt": "2+2", "completion": 4, "text": true}
not json
[1, 2]
"#;

const CSV: &str = "prompt,completion,messages\n\"a, b\",c,\"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"x\"\"}]\"\nshort row\n";

const TRAFFIC: &str = r#"{"type":"completion","id":"chatcmpl-1","time":"2026-01-01T00:00:00Z","revision":"r1","model":"m","messages":[{"role":"user","content":"hi"}],"output":"hello","finish_reason":"stop","prompt_tokens":3,"completion_tokens":1}
{"type":"completion","id":"cmpl-2","time":"2026-01-01T00:00:01Z","revision":"r1","model":"m","prompt":"2+2=","output":"4","finish_reason":"length","prompt_tokens":4,"completion_tokens":1,"user":"u"}
{"type":"feedback","id":"chatcmpl-1","time":"2026-01-01T00:01:00Z","rating":5,"correction":"Hello!"}
{"type":"feedback","id":"cmpl-2","time":"2026-01-01T00:01:00Z","rating":4,"comment":"ok"}
"#;

fn dataset_rows(dir: &Path) -> Result<()> {
    // The first byte picks the reader: 0 JSONL, 1 CSV, 2 text, 3 traffic log.
    let with = |selector: u8, bytes: &[u8]| [&[selector][..], bytes].concat();
    write(dir, "dataset_rows", "jsonl", &with(0, CHAT_JSONL.as_bytes()))?;
    write(dir, "dataset_rows", "jsonl-gz", &with(0, &gzip(CHAT_JSONL.as_bytes())?))?;
    write(dir, "dataset_rows", "jsonl-zst", &with(0, &zstd::encode_all(CHAT_JSONL.as_bytes(), 3)?))?;
    write(dir, "dataset_rows", "csv", &with(1, CSV.as_bytes()))?;
    write(dir, "dataset_rows", "csv-gz", &with(1, &gzip(CSV.as_bytes())?))?;
    write(dir, "dataset_rows", "text", &with(2, "first line\r\n\nsecond line\n\u{feff}third\n".as_bytes()))?;
    write(dir, "dataset_rows", "traffic", &with(3 + 4 * 4, TRAFFIC.as_bytes()))?;
    write(dir, "dataset_rows", "traffic-corrections", &with(3 + 128, TRAFFIC.as_bytes()))?;
    Ok(())
}

fn parquet_file(compression: Compression) -> Result<Vec<u8>> {
    let message_fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    let mut messages = ListBuilder::new(StructBuilder::from_fields(message_fields.clone(), 2));
    for (role, content) in [("user", "hi"), ("assistant", "hello")] {
        let item = messages.values();
        item.field_builder::<StringBuilder>(0).ok_or("role builder")?.append_value(role);
        item.field_builder::<StringBuilder>(1).ok_or("content builder")?.append_value(content);
        item.append(true);
    }
    messages.append(true);
    messages.append(false);
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("messages", Arc::new(messages.finish())),
        ("prompt", Arc::new(StringArray::from(vec![Some("2+2"), None]))),
        ("completion", Arc::new(Int32Array::from(vec![Some(4), Some(-1)]))),
        ("text", Arc::new(LargeStringArray::from(vec!["some text", "more"]))),
        ("score", Arc::new(Float64Array::from(vec![0.5, f64::NAN]))),
        ("ok", Arc::new(BooleanArray::from(vec![true, false]))),
    ];
    let batch = RecordBatch::try_from_iter(columns)?;
    let props = WriterProperties::builder().set_compression(compression).set_max_row_group_row_count(Some(1)).build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(out)
}

fn dataset_parquet(dir: &Path) -> Result<()> {
    write(dir, "dataset_parquet", "plain", &parquet_file(Compression::UNCOMPRESSED)?)?;
    write(dir, "dataset_parquet", "snappy", &parquet_file(Compression::SNAPPY)?)?;
    write(dir, "dataset_parquet", "zstd", &parquet_file(Compression::ZSTD(ZstdLevel::default()))?)?;
    Ok(())
}

fn assignment(dir: &Path, repo: &Path) -> Result<()> {
    for mode in ["prepare", "finetune", "eval", "serve"] {
        let text = std::fs::read_to_string(repo.join("proto/examples").join(format!("{mode}.yaml")))?;
        let parsed = llmops_proto::parse_assignment(&text)?;
        write(dir, "assignment", &format!("{mode}-yaml"), text.as_bytes())?;
        write(dir, "assignment", &format!("{mode}-json"), serde_json::to_string(&parsed)?.as_bytes())?;
        write(dir, "assignment", &format!("{mode}-wire"), &parsed.encode_to_vec())?;
    }
    Ok(())
}

fn gguf(dir: &Path) -> Result<()> {
    let bytes = llmops_worker::engine::tiny::tiny_gguf()?;
    write(dir, "gguf_header", "tiny", &bytes)?;
    Ok(())
}

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Templates in the styles models ship: ChatML, header-tagged turns with a BOS token,
/// [INST] turns that must alternate, and Python string methods.
const TEMPLATES: [(&str, &str); 4] = [
    ("chatml", CHATML),
    (
        "headers",
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    (
        "inst",
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
    ),
    (
        "pymethods",
        "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content.strip() %}{% elif m.content.startswith('/') %}{{ m.content.split(' ')[0].upper() }}{% else %}{{ (ns.sys ~ ': ' ~ m.content) | replace('\n', ' ') | truncate(40) }}{% endif %}{% endfor %}{{ messages | length }}{{ messages[-1].content[:3] | tojson }}",
    ),
];

fn chat_template(dir: &Path) -> Result<()> {
    let messages = br#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "{{ x }}"}]"#;
    for (name, template) in TEMPLATES {
        write(dir, "chat_template", name, &[template.as_bytes(), b"\0", messages].concat())?;
    }
    Ok(())
}

fn openai_request(dir: &Path) -> Result<()> {
    let requests = [
        ("chat", r#"{"model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 16, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": ["\n\n"], "stream": true, "stream_options": {"include_usage": true}, "seed": -1, "user": "u1"}"#),
        ("completion", r#"{"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 8, "n": 1, "repetition_penalty": 1.1, "presence_penalty": 0, "stop": "x", "echo": false, "best_of": 1}"#),
        ("completion-text", r#"{"model": "m", "prompt": ["one"], "logprobs": null, "suffix": null}"#),
        ("feedback", r#"{"id": "chatcmpl-1", "rating": 5, "correction": "better", "comment": "ok"}"#),
        ("chat-tools", r#"{"model": "m", "messages": [{"role": "assistant"}], "tools": [], "logprobs": false, "frequency_penalty": 0.0}"#),
    ];
    for (name, body) in requests {
        write(dir, "openai_request", name, body.as_bytes())?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: seeds <corpus directory>")?);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    openai_request(&dir)?;
    assignment(&dir, &repo)?;
    gguf(&dir)?;
    chat_template(&dir)?;
    dataset_rows(&dir)?;
    dataset_parquet(&dir)?;
    Ok(())
}
