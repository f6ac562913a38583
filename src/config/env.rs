//! What the environment says: the variable that overrides the mode and the one that turns
//! auto-start off, both read by one rule.
//!
//! A value is trimmed and read in any case; an empty one is as good as unset. The switch words
//! mean the same in both variables: `0`, `off`, `false` and `no` turn the mode and auto-start
//! off; `1`, `on`, `true` and `yes` leave them on (for the mode: `auto`). The mode's variable
//! also takes `auto`, `off` and `require`. Any other value is ignored, with one warning per
//! process that names the variable, the value and what is used instead.

use super::{InvalidMode, Mode};
use crate::protocol::DEFAULT_AUTO_START_ENV;
use crate::sync::warn_once;

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
    /// mode is ignored with a warning, which `misconfigured` gets too.
    pub(crate) fn apply(&self, builder_mode: Mode, misconfigured: &mut Vec<String>) -> Mode {
        let Some(word) = self.word() else {
            return builder_mode;
        };
        match mode_of(&word) {
            Some(mode) => mode,
            None => {
                let expected =
                    "auto, off, require, or a switch word (1, on, true, yes, 0, false, no)";
                let outcome = format!("the mode stays {builder_mode}");
                misconfigured.push(not_understood(self, &word, expected, &outcome));
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
    pub(crate) fn new() -> Self {
        Self {
            env: EnvOverride::Var(DEFAULT_AUTO_START_ENV.to_owned()),
            forced: false,
        }
    }

    /// Whether auto-start stays on: not turned off by its variable, and not under `CI` (a
    /// value other than empty, `0` or `false`) unless forced. Ephemeral CI machines gain
    /// nothing from a daemon. A value that is no switch word is ignored with a warning, which
    /// `misconfigured` gets too.
    pub(crate) fn enabled(&self, misconfigured: &mut Vec<String>) -> bool {
        let word = self.env.word();
        let switched = word.as_deref().and_then(switch);
        if let (Some(word), None) = (&word, switched) {
            let expected = "a switch word (0, off, false, no, or 1, on, true, yes)";
            misconfigured.push(not_understood(
                &self.env,
                word,
                expected,
                "auto-start stays on",
            ));
        }
        enabled(switched, std::env::var("CI").ok().as_deref(), self.forced)
    }
}

/// A mode, or a switch word (on: `auto`, off: `off`), in any case.
fn mode_of(word: &str) -> Option<Mode> {
    let switched = |on| if on { Mode::Auto } else { Mode::Off };
    word.parse::<Mode>()
        .ok()
        .or_else(|| switch(word).map(switched))
}

impl Mode {
    /// The mode the environment variable `name` sets, by the rule both of the crate's variables
    /// follow (see the README's options): `None` when it is unset or empty; `auto`, `off` and
    /// `require` in any case, and the switch words (`0`, `off`, `false`, `no` for off; `1`,
    /// `on`, `true`, `yes` for auto); an error naming the value otherwise.
    ///
    /// ```
    /// use tower_local_daemon::Mode;
    ///
    /// assert_eq!(Mode::from_env("TOWER_LOCAL_DAEMON_DOC_UNSET"), Ok(None));
    /// ```
    pub fn from_env(name: &str) -> Result<Option<Self>, InvalidMode> {
        let Some(word) = EnvOverride::Var(name.to_owned()).word() else {
            return Ok(None);
        };
        mode_of(&word).map(Some).ok_or(InvalidMode(word))
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

/// Logs a value that is not understood, once per process; returns the text.
fn not_understood(source: &EnvOverride, word: &str, expected: &str, outcome: &str) -> String {
    let name = source.var().unwrap_or("the injected value");
    let text = format!("{name}={word:?} is not understood: expected {expected}; {outcome}");
    warn_once(&text);
    text
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
            assert_eq!(
                env.apply(Mode::Require, &mut Vec::new()),
                Mode::Off,
                "{off:?}"
            );
            assert_eq!(switch(&env.word().unwrap()), Some(false), "{off:?}");
        }
        for on in ["1", "On", "TRUE", "yes"] {
            let env = EnvOverride::Value(Some(on.to_owned()));
            assert_eq!(env.apply(Mode::Off, &mut Vec::new()), Mode::Auto, "{on:?}");
            assert_eq!(switch(&env.word().unwrap()), Some(true), "{on:?}");
        }
        let require = EnvOverride::Value(Some("Require".to_owned()));
        assert_eq!(require.apply(Mode::Auto, &mut Vec::new()), Mode::Require);
        for ignored in [None, Some(""), Some("  "), Some("sometimes")] {
            let env = EnvOverride::Value(ignored.map(str::to_owned));
            assert_eq!(
                env.apply(Mode::Require, &mut Vec::new()),
                Mode::Require,
                "{ignored:?}"
            );
        }
        assert_eq!(switch("maybe"), None);
    }
}
