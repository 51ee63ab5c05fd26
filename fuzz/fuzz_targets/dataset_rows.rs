//! The dataset record readers: any bytes are a source file (JSONL, CSV or plain text,
//! gzip- or zstd-compressed or not, recognised by their magic bytes as the reader does)
//! or a traffic log, read row by row and mapped onto each record schema. A bad row is an
//! error row with its line; nothing panics. The first byte picks the format.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llmops_proto::v1::FieldMapping;
use llmops_worker::prepare::record::{Schema, from_row};
use llmops_worker::prepare::source::{Digests, Format, Row, feedback_rows, file_rows};

/// A scratch directory of this process (fuzzing runs one input at a time).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("llmops-fuzz-rows-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("traffic")).expect("scratch directory");
        dir
    })
}

fn map_rows(rows: impl Iterator<Item = Row>) {
    let mapping = FieldMapping { messages: "conv".into(), system: "sys".into(), text: "body".into(), ..Default::default() };
    for row in rows.take(10_000) {
        assert!(row.line >= 1 || row.value.is_err(), "a row that reads has its line");
        let Ok(fields) = row.value else { continue };
        for schema in [Schema::Chat, Schema::Completion, Schema::Text] {
            for mapping in [None, Some(&mapping)] {
                if let Ok(mut record) = from_row(&fields, schema, mapping) {
                    let _ = record.content();
                    let _ = record.texts_mut();
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, content)) = data.split_first() else { return };
    let dir = scratch();
    match selector % 4 {
        3 => {
            let log = dir.join("traffic").join("pod-0.jsonl");
            std::fs::write(&log, content).expect("write the traffic log");
            if let Ok(rows) = feedback_rows(&dir.join("traffic"), u32::from(selector / 4 % 6), selector >= 128, "2100-01-01T00:00:00Z") {
                map_rows(rows);
            }
        }
        n => {
            let format = [Format::Jsonl, Format::Csv, Format::Text][usize::from(n)];
            let file = dir.join("source");
            std::fs::write(&file, content).expect("write the source file");
            if let Ok(rows) = file_rows(&file, format, &Digests::default()) {
                map_rows(rows);
            }
        }
    }
});
