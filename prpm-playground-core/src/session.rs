//! Playground records: packages (the prompts), sessions (multi-turn conversations, shareable)
//! and runs (one model call each, with its tokens, credits, cost, latency and outcome).
//!
//! The types and their validation live here; both stores keep them (see the session methods
//! of [`crate::Store`]). A session belongs to one account: every read or write of it names the
//! owner, and a session of another owner is reported as not found.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ledger::{AccountId, HoldId};
use crate::pricing::TokenUsage;

/// Largest package prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 200_000;
/// Largest turn (a user input or a model response), in bytes.
pub const MAX_TURN_BYTES: usize = 400_000;
/// Most turns a session may hold.
pub const MAX_TURNS_PER_SESSION: u32 = 1_000;
/// Largest page of sessions or runs.
pub const MAX_PAGE: u32 = 100;
const MAX_NAME_BYTES: usize = 256;
const MAX_TITLE_BYTES: usize = 200;

fn check_text(field: &'static str, s: &str, max: usize, allow_empty: bool, allow_newlines: bool) -> Result<()> {
    if s.is_empty() && !allow_empty {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(Error::invalid(field, format!("longer than {max} bytes")));
    }
    if s.chars().any(|c| c.is_control() && !(allow_newlines && matches!(c, '\n' | '\r' | '\t'))) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// A package: the registry's unit whose prompt a run uses as its system prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub id: String,
    pub name: String,
    pub version: String,
    pub prompt: String,
}

impl Package {
    pub fn validate(&self) -> Result<()> {
        check_text("package_id", &self.id, MAX_NAME_BYTES, false, false)?;
        check_text("package_name", &self.name, MAX_NAME_BYTES, false, false)?;
        check_text("package_version", &self.version, 64, false, false)?;
        check_text("prompt", &self.prompt, MAX_PROMPT_BYTES, true, true)
    }
}

/// `n` random bytes from the operating system's CSPRNG, as lowercase hex.
fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(field: &'static str, s: &str, len: usize) -> Result<()> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(Error::invalid(field, format!("must be {len} lowercase hex characters")));
    }
    Ok(())
}

macro_rules! hex_id {
    ($(#[$m:meta])* $name:ident, $field:literal, $bytes:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A fresh id: random bytes from the operating system's CSPRNG.
            pub fn generate() -> Self {
                $name(random_hex($bytes))
            }
            pub fn parse(s: &str) -> Result<Self> {
                parse_hex($field, s, 2 * $bytes)?;
                Ok($name(s.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                $name::parse(&s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

hex_id!(
    /// A session id: 128 random bits, 32 hex characters.
    SessionId, "session_id", 16
);
hex_id!(
    /// A run id: 128 random bits, 32 hex characters. Also the idempotency key of the run's hold.
    RunId, "run_id", 16
);
hex_id!(
    /// A share token: 256 random bits from the CSPRNG, 64 hex characters. Whoever has it can
    /// read the conversation (and nothing else) until the owner revokes it.
    ShareToken, "share_token", 32
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(Error::Invariant(format!("unknown role {other:?}"))),
        }
    }
}

/// A turn to append: who said it and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTurn {
    pub role: Role,
    pub content: String,
}

impl NewTurn {
    /// Any text up to [`MAX_TURN_BYTES`] without NUL characters (a model's answer may carry
    /// other control characters, terminal escapes included; they are kept as they came).
    pub fn validate(&self) -> Result<()> {
        if self.content.len() > MAX_TURN_BYTES {
            return Err(Error::invalid("content", format!("longer than {MAX_TURN_BYTES} bytes")));
        }
        if self.content.contains('\0') {
            return Err(Error::invalid("content", "contains a NUL character"));
        }
        Ok(())
    }

    /// `text` made storable: NUL characters removed, cut to [`MAX_TURN_BYTES`] on a character
    /// boundary.
    pub fn storable(text: &str) -> String {
        let mut s: String = text.chars().filter(|c| *c != '\0').collect();
        if s.len() > MAX_TURN_BYTES {
            let mut end = MAX_TURN_BYTES;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    }
}

/// One stored turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// 1, 2, 3, ... within the session.
    pub seq: u32,
    pub role: Role,
    pub content: String,
    /// The run that produced (or answered) this turn.
    pub run_id: Option<RunId>,
    pub at: DateTime<Utc>,
}

/// What creating a session needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub id: SessionId,
    pub owner: AccountId,
    pub package_id: Option<String>,
    pub model: String,
    pub title: String,
}

impl NewSession {
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.package_id {
            check_text("package_id", p, MAX_NAME_BYTES, false, false)?;
        }
        check_text("model", &self.model, 128, false, false)?;
        check_text("title", &self.title, MAX_TITLE_BYTES, true, false)
    }
}

/// A session without its turns (for lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: SessionId,
    pub owner: AccountId,
    pub package_id: Option<String>,
    pub model: String,
    pub title: String,
    pub turns: u32,
    pub shared: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A session with its conversation, as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub summary: SessionSummary,
    pub share_token: Option<ShareToken>,
    pub turns: Vec<Turn>,
}

/// One page of an owner's sessions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPage {
    pub sessions: Vec<SessionSummary>,
    /// Pass to the next call for the following page; `None` on the last page.
    pub next: Option<String>,
}

/// A turn as the public sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedTurn {
    pub role: Role,
    pub content: String,
}

/// A shared session as the public sees it: the conversation only. No owner, no credits, no
/// costs, no run ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSession {
    pub title: String,
    pub package_id: Option<String>,
    pub model: String,
    pub turns: Vec<SharedTurn>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// The model answered; settled with the provider's reported usage.
    Completed,
    /// The provider call failed; the hold was released and nothing charged.
    Failed,
    /// The stream broke or the caller went away: settled for what was consumed.
    Interrupted,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Completed => "completed",
            RunOutcome::Failed => "failed",
            RunOutcome::Interrupted => "interrupted",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "completed" => Ok(RunOutcome::Completed),
            "failed" => Ok(RunOutcome::Failed),
            "interrupted" => Ok(RunOutcome::Interrupted),
            other => Err(Error::Invariant(format!("unknown run outcome {other:?}"))),
        }
    }
}

/// One model call, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: RunId,
    pub account: AccountId,
    pub session: Option<SessionId>,
    pub package_id: Option<String>,
    pub model: String,
    /// False for the no-prompt half of a comparison.
    pub with_prompt: bool,
    pub tokens: TokenUsage,
    pub credits: i64,
    pub cost_micros: i64,
    pub latency_ms: u64,
    pub outcome: RunOutcome,
    /// The error code of a failed or interrupted run.
    pub error: Option<String>,
    pub hold: Option<HoldId>,
    pub at: DateTime<Utc>,
}

impl RunRecord {
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.package_id {
            check_text("package_id", p, MAX_NAME_BYTES, false, false)?;
        }
        check_text("model", &self.model, 128, false, false)?;
        if let Some(e) = &self.error {
            check_text("error", e, MAX_NAME_BYTES, false, false)?;
        }
        self.tokens.validate()?;
        if self.credits < 0 || self.cost_micros < 0 {
            return Err(Error::invalid("credits", "credits and cost must not be negative"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_hex_and_parse_back() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert_eq!(SessionId::parse(a.as_str()).unwrap(), a);
        let t = ShareToken::generate();
        assert_eq!(t.as_str().len(), 64, "256 bits");
        assert!(SessionId::parse("not-hex").is_err());
        assert!(SessionId::parse(&"A".repeat(32)).is_err(), "uppercase is not the canonical form");
        assert!(ShareToken::parse(a.as_str()).is_err(), "a session id is too short to be a token");
    }

    #[test]
    fn text_limits() {
        let p = Package { id: "p".into(), name: "n".into(), version: "1.0.0".into(), prompt: "line\nline".into() };
        p.validate().unwrap();
        assert!(Package { prompt: "x".repeat(MAX_PROMPT_BYTES + 1), ..p.clone() }.validate().is_err());
        assert!(Package { id: "a\nb".into(), ..p }.validate().is_err());
        assert!(NewTurn { role: Role::User, content: "x".repeat(MAX_TURN_BYTES + 1) }.validate().is_err());
        assert!(NewTurn { role: Role::Assistant, content: "\u{1b}[31mred\u{1b}[0m\n".into() }.validate().is_ok());
        assert!(NewTurn { role: Role::User, content: "a\0b".into() }.validate().is_err());
        let long = "é".repeat(MAX_TURN_BYTES);
        let cut = NewTurn::storable(&long);
        assert!(cut.len() <= MAX_TURN_BYTES && cut.chars().all(|c| c == 'é'));
        assert_eq!(NewTurn::storable("a\0b"), "ab");
    }
}
