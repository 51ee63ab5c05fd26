//! Assignments as the worker reads them: YAML or JSON text (`--assignment`, the
//! agent's files) and the protobuf wire form (the gateway). Whatever parses must
//! validate without panicking, and what serializes must read back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmops_proto::{Assignment, Validate, parse_assignment, to_yaml};
use prost::Message;

fn exercise(assignment: &Assignment) {
    if let Err(errors) = assignment.validate() {
        assert!(!errors.is_empty(), "an invalid assignment names at least one field");
        let _ = llmops_proto::validate::describe(&errors);
    }
    // The YAML form is what `--check` prints and what a pod may be handed: it must read
    // back as the same Assignment. (Compared as values, not as text: protobuf map fields
    // are hash maps, so their keys come out in no fixed order; NaN is never equal.)
    let Ok(yaml) = to_yaml(assignment) else { return };
    let again = parse_assignment(&yaml).unwrap_or_else(|e| panic!("its own YAML does not parse: {e}\n{yaml}"));
    assert!(
        again == *assignment || format!("{assignment:?}").contains("NaN"),
        "the YAML round trip changed the Assignment:\n{yaml}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(assignment) = parse_assignment(text)
    {
        exercise(&assignment);
    }
    if let Ok(assignment) = Assignment::decode(data) {
        exercise(&assignment);
    }
});
