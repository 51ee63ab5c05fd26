//! GGUF files as the loader reads them: any bytes are a model file handed to the
//! worker. The header must be refused with an error or describe a model whose every
//! tensor lies inside the file; such a model then loads (on the CPU, from memory)
//! or is refused, and a model that loads takes a step, never panicking and never allocating more than the file implies.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use llmops_worker::engine::loader::{WeightFormat, load_gguf_from, read_gguf_header};
use llmops_worker::engine::model::KvCache;

fuzz_target!(|data: &[u8]| {
    let name = Path::new("fuzz.gguf");
    let Ok(header) = read_gguf_header(&mut Cursor::new(data), name) else { return };
    let c = &header.config;
    assert!(c.num_heads > 0 && c.num_kv_heads > 0 && c.head_dim > 0 && c.num_layers > 0);
    assert!(header.tokenizer.vocab_size() <= c.vocab_size);
    for format in [WeightFormat::AsStored, WeightFormat::Dense] {
        if let Ok(model) = load_gguf_from(Cursor::new(data), name, &Device::Cpu, format) {
            assert_eq!(model.model.config().num_layers, c.num_layers);
            // A model that loads runs: its shapes fit together, so a step errs or succeeds.
            let prompt = model.tokenizer.encode_prompt("ab<|im_end|>").unwrap_or_default();
            if !prompt.is_empty() {
                let _ = model.model.forward(&prompt, &mut KvCache::default(), false);
            }
        }
    }
});
