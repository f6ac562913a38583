//! What the environment says: the variable that overrides the mode and the one that turns
//! auto-start off, both read by one rule.
//!
//! A value is trimmed and read in any case; an empty one is as good as unset. The switch words
//! mean the same in both variables: `0`, `off`, `false` and `no` turn the mode and auto-start
//! off; `1`, `on`, `true` and `yes` leave them on (for the mode: `auto`). The mode's variable
//! also takes `auto`, `off` and `require`. Any other value is ignored, with one warning per
//! process that names the variable, the value and what is used instead.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use super::Mode;
use crate::sync::lock;

/// The default environment variable that overrides the mode.
pub const DEFAULT_MODE_ENV: &str = "HEDDLE_LOCAL_DAEMON";

/// Where an environment override (the mode's, auto-start's switch) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EnvOverride {
    /// Read this environment variable when the layer builds a service.
    Var(String),
    /// A value given as if it were the variable's (tests inject it this way).
    Value(Option<String>),
}

impl EnvOverride {
    /// The variable's value (or the injected one), trimmed; `None` when unset or empty.
    fn word(&self) -> Option<String> {
        let value = match self {
            Self::Var(name) => std::env::var(name).ok(),
            Self::Value(value) => value.clone(),
        }?;
        let word = value.trim();
        (!word.is_empty()).then(|| word.to_owned())
    }

    /// The variable's name, when it is read from the environment.
    pub(crate) fn var(&self) -> Option<&str> {
        match self {
            Self::Var(name) => Some(name),
            Self::Value(_) => None,
        }
    }

    /// The mode after the override: the environment beats the builder, and a value that is no
    /// mode is ignored with a warning.
    pub(crate) fn apply(&self, builder_mode: Mode) -> Mode {
        let Some(word) = self.word() else {
            return builder_mode;
        };
        let switched = |on| if on { Mode::Auto } else { Mode::Off };
        match word
            .parse::<Mode>()
            .ok()
            .or_else(|| switch(&word).map(switched))
        {
            Some(mode) => mode,
            None => {
                let expected =
                    "auto, off, require, or a switch word (1, on, true, yes, 0, false, no)";
                warn_once(
                    self,
                    &word,
                    expected,
                    &format!("the mode stays {builder_mode}"),
                );
                builder_mode
            }
        }
    }
}

/// Whether auto-start is on, after the environment: resolved when a layer builds a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AutoStartSwitch {
    /// The variable that turns auto-start off, or its injected value.
    pub(crate) env: EnvOverride,
    /// Whether to start a daemon also under `CI`.
    pub(crate) forced: bool,
}

impl AutoStartSwitch {
    /// The default variable that turns auto-start off.
    pub(crate) const DEFAULT_ENV: &'static str = "HEDDLE_LOCAL_DAEMON_AUTO_START";

    pub(crate) fn new() -> Self {
        Self {
            env: EnvOverride::Var(Self::DEFAULT_ENV.to_owned()),
            forced: false,
        }
    }

    /// Whether auto-start stays on: not turned off by its variable, and not under `CI` (a
    /// value other than empty, `0` or `false`) unless forced. Ephemeral CI machines gain
    /// nothing from a daemon.
    pub(crate) fn enabled(&self) -> bool {
        let word = self.env.word();
        let switched = word.as_deref().and_then(switch);
        if let (Some(word), None) = (&word, switched) {
            let expected = "a switch word (0, off, false, no, or 1, on, true, yes)";
            warn_once(&self.env, word, expected, "auto-start stays on");
        }
        enabled(switched, std::env::var("CI").ok().as_deref(), self.forced)
    }
}

/// A switch word: `Some(false)` for `0`, `off`, `false` and `no`; `Some(true)` for `1`, `on`,
/// `true` and `yes`; in any case.
fn switch(word: &str) -> Option<bool> {
    let is = |words: [&str; 4]| words.iter().any(|w| word.eq_ignore_ascii_case(w));
    match () {
        () if is(["0", "off", "false", "no"]) => Some(false),
        () if is(["1", "on", "true", "yes"]) => Some(true),
        () => None,
    }
}

fn enabled(switch: Option<bool>, ci: Option<&str>, forced: bool) -> bool {
    if switch == Some(false) {
        return false;
    }
    let under_ci = ci.is_some_and(|v| !matches!(v.trim(), "" | "0" | "false"));
    forced || !under_ci
}

/// Logs a value that is not understood, once per process for each variable and value: a CLI
/// builds its layer on every run, and one line is enough to be seen.
fn warn_once(source: &EnvOverride, word: &str, expected: &str, outcome: &str) {
    static WARNED: OnceLock<Mutex<HashSet<(String, String)>>> = OnceLock::new();
    let name = source.var().unwrap_or("the injected value");
    let key = (name.to_owned(), word.to_owned());
    if lock(WARNED.get_or_init(Default::default)).insert(key) {
        tracing::warn!("{name}={word:?} is not understood: expected {expected}; {outcome}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_start_is_off_when_switched_off_and_under_ci_unless_forced() {
        assert!(enabled(None, None, false));
        assert!(enabled(Some(true), Some(""), false));
        assert!(enabled(None, Some("false"), false));
        assert!(!enabled(Some(false), None, false));
        assert!(!enabled(Some(false), None, true));
        assert!(!enabled(None, Some("true"), false));
        assert!(enabled(None, Some("true"), true));
    }

    #[test]
    fn both_variables_read_the_switch_words_in_any_case() {
        for off in ["0", "off", "OFF", "False", " no "] {
            let env = EnvOverride::Value(Some(off.to_owned()));
            assert_eq!(env.apply(Mode::Require), Mode::Off, "{off:?}");
            assert_eq!(switch(&env.word().unwrap()), Some(false), "{off:?}");
        }
        for on in ["1", "On", "TRUE", "yes"] {
            let env = EnvOverride::Value(Some(on.to_owned()));
            assert_eq!(env.apply(Mode::Off), Mode::Auto, "{on:?}");
            assert_eq!(switch(&env.word().unwrap()), Some(true), "{on:?}");
        }
        let require = EnvOverride::Value(Some("Require".to_owned()));
        assert_eq!(require.apply(Mode::Auto), Mode::Require);
        for ignored in [None, Some(""), Some("  "), Some("sometimes")] {
            let env = EnvOverride::Value(ignored.map(str::to_owned));
            assert_eq!(env.apply(Mode::Require), Mode::Require, "{ignored:?}");
        }
        assert_eq!(switch("maybe"), None);
    }
}
