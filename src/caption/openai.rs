//! The OpenAI chat-completions shapes that Marquee speaks: what the remote client
//! sends and reads, and what the caption server reads and answers. Only the fields
//! Marquee uses; anything else in a request or an answer is ignored.

use serde::{Deserialize, Serialize};

/// A chat-completions request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model asked for (the server answers with its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Sampling temperature (Marquee asks for 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// The conversation: Marquee sends one user message.
    pub messages: Vec<Message>,
    /// Most tokens to generate (the newer name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    /// Most tokens to generate (the older name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
}

/// One message of a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// `user`, `system`, ...
    #[serde(default)]
    pub role: String,
    /// Its parts (a message whose content is plain text has none Marquee reads).
    #[serde(default, deserialize_with = "parts_or_text")]
    pub content: Vec<Part>,
}

/// A part of a message's content: text, or an image by URL.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Part {
    /// `text` or `image_url`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The text of a text part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The image of an image part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<ImageUrl>,
}

/// An image given by URL (Marquee: a base64 data URL).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageUrl {
    /// `data:image/jpeg;base64,...`
    pub url: String,
}

/// A content that is a list of parts, or plain text (read as no parts).
fn parts_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Part>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Parts(Vec<Part>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Content::deserialize(d)? {
        Content::Parts(p) => p,
        Content::Other(_) => Vec::new(),
    })
}

impl ChatRequest {
    /// Every part of every message, in order.
    pub fn parts(&self) -> impl Iterator<Item = &Part> {
        self.messages.iter().flat_map(|m| &m.content)
    }
}

/// A chat-completions answer, or one chunk of a streamed one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The answer's id.
    #[serde(default)]
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model that answered.
    #[serde(default)]
    pub model: Option<String>,
    /// The answers (Marquee reads the first).
    #[serde(default)]
    pub choices: Vec<Choice>,
    /// Tokens read and written.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// One answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Choice {
    /// Its place among the answers.
    #[serde(default)]
    pub index: u32,
    /// The whole answer (not streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Reply>,
    /// A piece of it (streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Reply>,
    /// `stop` on the last piece; null before.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// What the assistant said.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    /// `assistant`, on the first piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Tokens read and written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens the model read.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens it wrote.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Both.
    #[serde(default)]
    pub total_tokens: u64,
}
