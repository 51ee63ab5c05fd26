//! Plain-text output: tree drawing shared by `status` and `lineage`, and colour that is
//! only ever added on top of text that reads the same without it.

/// Whether to colour, decided once from `--color` and the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Paint {
    color: bool,
}

/// How something reads at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Done, serving, passed.
    Good,
    /// Working or waiting.
    Busy,
    /// Failed, stalled, missing.
    Bad,
    /// Names of objects.
    Strong,
    /// Secondary text such as digests.
    Faint,
}

impl Paint {
    /// Colour when `color` is set.
    pub fn new(color: bool) -> Self {
        Paint { color }
    }

    /// No colour at all (tests, pipes).
    pub fn plain() -> Self {
        Paint { color: false }
    }

    /// `text` in `tone`, or `text` itself without colour.
    pub fn paint(&self, tone: Tone, text: &str) -> String {
        if !self.color || text.is_empty() {
            return text.to_string();
        }
        let code = match tone {
            Tone::Good => "32",
            Tone::Busy => "33",
            Tone::Bad => "31",
            Tone::Strong => "1",
            Tone::Faint => "2",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// What the tree drawer needs of a node.
pub trait TreeNode {
    /// The node's first line.
    fn header(&self, paint: &Paint) -> String;
    /// Further lines about the node, drawn under its header.
    fn details(&self, paint: &Paint) -> Vec<String>;
    /// The nodes drawn under it.
    fn children(&self) -> &[Self]
    where
        Self: Sized;
}

/// Draws `roots` as trees, one after the other, with box-drawing connectors:
///
/// ```text
/// Dataset/acme-facts  Succeeded  Ready=True (Succeeded)
/// │ sha256 3f2a9c1d8e7b
/// └─ FineTuneJob/acme-facts-lora  Running 12/60  Ready=False (Running)
/// ```
pub fn draw<N: TreeNode>(roots: &[N], paint: &Paint) -> String {
    let mut out = String::new();
    for root in roots {
        draw_node(root, "", "", paint, &mut out);
    }
    out
}

fn draw_node<N: TreeNode>(node: &N, lead: &str, rest: &str, paint: &Paint, out: &mut String) {
    out.push_str(lead);
    out.push_str(&node.header(paint));
    out.push('\n');
    let children = node.children();
    let bar = if children.is_empty() { "  " } else { "│ " };
    for line in node.details(paint) {
        out.push_str(rest);
        out.push_str(bar);
        out.push_str(&line);
        out.push('\n');
    }
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        let lead = format!("{rest}{}", if last { "└─ " } else { "├─ " });
        let rest = format!("{rest}{}", if last { "   " } else { "│  " });
        draw_node(child, &lead, &rest, paint, out);
    }
}

/// A message on one line: whitespace runs (line breaks included) become one space, and
/// unless `wide` it is cut at `limit` characters with an ellipsis.
pub fn one_line(text: &str, wide: bool, limit: usize) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if wide || joined.chars().count() <= limit {
        return joined;
    }
    let mut cut: String = joined.chars().take(limit).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    struct N(&'static str, Vec<&'static str>, Vec<N>);

    impl TreeNode for N {
        fn header(&self, _: &Paint) -> String {
            self.0.to_string()
        }
        fn details(&self, _: &Paint) -> Vec<String> {
            self.1.iter().map(|s| s.to_string()).collect()
        }
        fn children(&self) -> &[Self] {
            &self.2
        }
    }

    #[test]
    fn trees_are_drawn_with_details_under_their_node() {
        let tree = N(
            "a",
            vec!["a1"],
            vec![N("b", vec!["b1"], vec![N("c", vec![], vec![])]), N("d", vec!["d1", "d2"], vec![])],
        );
        let text = draw(&[tree, N("e", vec![], vec![])], &Paint::plain());
        assert_eq!(text, "a\n│ a1\n├─ b\n│  │ b1\n│  └─ c\n└─ d\n     d1\n     d2\ne\n");
    }

    #[test]
    fn messages_are_folded_onto_one_line_and_cut_unless_wide() {
        assert_eq!(one_line("a\n  b\tc", false, 100), "a b c");
        assert_eq!(one_line("abcdef", false, 3), "abc…");
        assert_eq!(one_line("abcdef", true, 3), "abcdef");
    }

    #[test]
    fn colour_is_only_added_when_asked_for() {
        assert_eq!(Paint::plain().paint(Tone::Bad, "x"), "x");
        assert_eq!(Paint::new(true).paint(Tone::Bad, "x"), "\x1b[31mx\x1b[0m");
    }
}
