//! The Parquet record reader: any bytes are a Parquet source file, read row by row
//! (every Arrow type the reader maps to JSON) and mapped onto each record schema. A file
//! that cannot be read is an error, a bad batch an error row; nothing panics.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llmops_worker::prepare::record::{Schema, from_row};
use llmops_worker::prepare::source::{Digests, Format, file_rows};

fn scratch() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| std::env::temp_dir().join(format!("llmops-fuzz-parquet-{}.parquet", std::process::id())))
}

/// The reader contains the parquet crate's panics (see `prepare::source`); libFuzzer's
/// hook aborts on every panic, caught or not, so it is replaced by one that only prints.
/// A panic that escapes the reader still fails the input: the harness aborts on it.
fn contained_panics_are_not_crashes() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| std::panic::set_hook(Box::new(|info| eprintln!("{info}"))));
}

fuzz_target!(|data: &[u8]| {
    contained_panics_are_not_crashes();
    let file = scratch();
    std::fs::write(file, data).expect("write the source file");
    let Ok(rows) = file_rows(file, Format::Parquet, &Digests::default()) else { return };
    for row in rows.take(10_000) {
        let Ok(fields) = row.value else { continue };
        for schema in [Schema::Chat, Schema::Completion, Schema::Text] {
            let _ = from_row(&fields, schema, None);
        }
    }
});
