//! Writing a split: Parquet (zstd, row groups of bounded size, so memory stays bounded)
//! and JSONL when asked. Files are written under a temporary name and renamed into place
//! by the pipeline once everything is written.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields, Schema as ArrowSchema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::record::{Record, Schema};

/// Records buffered before they are handed to the Parquet writer as one batch.
const BATCH: usize = 4096;
/// Rows per Parquet row group: what the writer holds in memory at most.
const ROW_GROUP: usize = 16 * 1024;

fn message_fields() -> Fields {
    Fields::from(vec![Field::new("role", DataType::Utf8, false), Field::new("content", DataType::Utf8, false)])
}

/// The Arrow schema of records of `schema`.
pub fn arrow_schema(schema: Schema) -> Arc<ArrowSchema> {
    Arc::new(ArrowSchema::new(match schema {
        Schema::Text => vec![Field::new("text", DataType::Utf8, false)],
        Schema::Completion => {
            vec![Field::new("prompt", DataType::Utf8, false), Field::new("completion", DataType::Utf8, false)]
        }
        Schema::Chat => vec![Field::new(
            "messages",
            DataType::List(Arc::new(Field::new("item", DataType::Struct(message_fields()), false))),
            false,
        )],
    }))
}

fn batch(schema: Schema, records: &[Record]) -> Result<RecordBatch> {
    let strings = |pick: &dyn Fn(&Record) -> Option<&str>| -> ArrayRef {
        Arc::new(records.iter().map(|r| pick(r).unwrap_or_default()).map(Some).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = match schema {
        Schema::Text => vec![strings(&|r| match r {
            Record::Text { text } => Some(text),
            _ => None,
        })],
        Schema::Completion => vec![
            strings(&|r| match r {
                Record::Completion { prompt, .. } => Some(prompt),
                _ => None,
            }),
            strings(&|r| match r {
                Record::Completion { completion, .. } => Some(completion),
                _ => None,
            }),
        ],
        Schema::Chat => {
            let mut lengths = Vec::with_capacity(records.len());
            let (mut roles, mut contents) = (Vec::new(), Vec::new());
            for r in records {
                let messages = match r {
                    Record::Chat { messages } => messages.as_slice(),
                    _ => &[],
                };
                lengths.push(messages.len());
                for m in messages {
                    roles.push(Some(m.role.as_str()));
                    contents.push(Some(m.content.as_str()));
                }
            }
            let items = StructArray::new(
                message_fields(),
                vec![
                    Arc::new(roles.into_iter().collect::<StringArray>()) as ArrayRef,
                    Arc::new(contents.into_iter().collect::<StringArray>()) as ArrayRef,
                ],
                None,
            );
            let field = Arc::new(Field::new("item", DataType::Struct(message_fields()), false));
            vec![Arc::new(ListArray::new(field, OffsetBuffer::from_lengths(lengths), Arc::new(items), None)) as ArrayRef]
        }
    };
    Ok(RecordBatch::try_new(arrow_schema(schema), columns)?)
}

/// The writers of one split.
pub struct SplitWriter {
    schema: Schema,
    parquet: ArrowWriter<File>,
    jsonl: Option<BufWriter<File>>,
    pending: Vec<Record>,
    /// Records written.
    pub records: u64,
    /// Final paths of the files once renamed, with their temporary paths.
    pub files: Vec<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for SplitWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitWriter").field("records", &self.records).finish()
    }
}

impl SplitWriter {
    /// Creates `<split>.parquet` (and `<split>.jsonl`) in `staging`, to be moved to `out`.
    pub fn create(staging: &Path, out: &Path, split: &str, schema: Schema, jsonl: bool) -> Result<Self> {
        let parquet_tmp = staging.join(format!("{split}.parquet"));
        let file = File::create(&parquet_tmp).with_context(|| format!("creating {}", parquet_tmp.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
            .set_max_row_group_row_count(Some(ROW_GROUP))
            .build();
        let parquet = ArrowWriter::try_new(file, arrow_schema(schema), Some(props))?;
        let mut files = vec![(out.join(format!("{split}.parquet")), parquet_tmp)];
        let jsonl = if jsonl {
            let tmp = staging.join(format!("{split}.jsonl"));
            let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            files.push((out.join(format!("{split}.jsonl")), tmp));
            Some(BufWriter::with_capacity(1 << 16, file))
        } else {
            None
        };
        Ok(Self { schema, parquet, jsonl, pending: Vec::with_capacity(BATCH), records: 0, files })
    }

    /// Adds a record.
    pub fn write(&mut self, record: Record) -> Result<()> {
        if let Some(jsonl) = &mut self.jsonl {
            serde_json::to_writer(&mut *jsonl, &record)?;
            jsonl.write_all(b"\n")?;
        }
        self.pending.push(record);
        self.records += 1;
        if self.pending.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            let b = batch(self.schema, &self.pending)?;
            self.parquet.write(&b)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Writes what is buffered and closes the files.
    pub fn finish(mut self) -> Result<(u64, Vec<(PathBuf, PathBuf)>)> {
        self.flush()?;
        self.parquet.close()?;
        if let Some(mut jsonl) = self.jsonl.take() {
            jsonl.flush()?;
        }
        Ok((self.records, self.files))
    }
}
