//! Florence-2's task tokens, the prompts its processor swaps them for, and the clean-up
//! of generated text.

use serde::{Deserialize, Serialize};

/// A Florence-2 task prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// `<CAPTION>`: one sentence.
    #[default]
    Caption,
    /// `<DETAILED_CAPTION>`.
    DetailedCaption,
    /// `<MORE_DETAILED_CAPTION>`.
    MoreDetailedCaption,
    /// `<OCR>`: the text on the image.
    Ocr,
}

impl Task {
    /// Every task, in order.
    pub const ALL: [Task; 4] = [
        Task::Caption,
        Task::DetailedCaption,
        Task::MoreDetailedCaption,
        Task::Ocr,
    ];

    /// The task token, as users of Florence-2 write it.
    pub fn token(self) -> &'static str {
        match self {
            Task::Caption => "<CAPTION>",
            Task::DetailedCaption => "<DETAILED_CAPTION>",
            Task::MoreDetailedCaption => "<MORE_DETAILED_CAPTION>",
            Task::Ocr => "<OCR>",
        }
    }

    /// The text the processor puts in place of the token (`processing_florence2.py`).
    pub fn prompt(self) -> &'static str {
        match self {
            Task::Caption => "What does the image describe?",
            Task::DetailedCaption => "Describe in detail what is shown in the image.",
            Task::MoreDetailedCaption => "Describe with a paragraph what is shown in the image.",
            Task::Ocr => "What is the text in the image?",
        }
    }

    /// The task's name as the CLI and the APIs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Task::Caption => "caption",
            Task::DetailedCaption => "detailed_caption",
            Task::MoreDetailedCaption => "more_detailed_caption",
            Task::Ocr => "ocr",
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    /// Accepts `caption`, `detailed-caption`, `<DETAILED_CAPTION>` and the like.
    fn from_str(s: &str) -> Result<Self, String> {
        let key = s
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_ascii_lowercase()
            .replace('-', "_");
        Task::ALL
            .into_iter()
            .find(|t| t.name() == key)
            .ok_or_else(|| {
                format!("unknown task {s:?}: use caption, detailed_caption, more_detailed_caption or ocr")
            })
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decoded text -> clean text: special tokens out, whitespace collapsed, trimmed.
pub fn clean(text: &str) -> String {
    let mut t = text.to_string();
    for special in ["<s>", "</s>", "<pad>", "<unk>"] {
        t = t.replace(special, " ");
    }
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_parse_in_every_spelling() {
        assert_eq!("<CAPTION>".parse(), Ok(Task::Caption));
        assert_eq!(
            "more-detailed-caption".parse(),
            Ok(Task::MoreDetailedCaption)
        );
        assert_eq!("OCR".parse(), Ok(Task::Ocr));
        assert!("<OD>".parse::<Task>().is_err());
    }

    #[test]
    fn cleaning_drops_specials_and_spaces() {
        assert_eq!(
            clean("</s><s> A  cat\non a mat.</s><pad>"),
            "A cat on a mat."
        );
    }
}
