//! Running commands: each is printed (prefixed with `$`) before it runs.

use std::{
    fmt::Write as _,
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, ensure};

pub(crate) fn print_command(cmd: &Command) {
    let mut line = String::from("$");
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(line, " (cd {})", dir.display());
    }
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            let value = value.to_string_lossy();
            // PATH is long: show only what we put in front.
            let shown = match key.to_str() {
                Some("PATH") => value
                    .split(':')
                    .next()
                    .map_or(value.to_string(), |first| format!("{first}:$PATH")),
                _ => value.into_owned(),
            };
            let _ = write!(line, " {}={shown}", key.to_string_lossy());
        }
    }
    let _ = write!(line, " {}", cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) || arg.contains('$') {
            let _ = write!(line, " '{arg}'");
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    eprintln!("{line}");
}

/// Runs a command, failing if it does not exit successfully.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    print_command(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd.status().with_context(|| format!("running {program}"))?;
    ensure!(status.success(), "{program} failed ({status})");
    Ok(())
}

/// Runs a command and returns its exit code as ours.
pub(crate) fn exit_code_of(cmd: &mut Command) -> Result<ExitCode> {
    print_command(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd.status().with_context(|| format!("running {program}"))?;
    Ok(if let Some(code) = status.code() {
        ExitCode::from(u8::try_from(code).unwrap_or(1))
    } else {
        eprintln!("xtask: {program} was killed ({status})");
        ExitCode::FAILURE
    })
}

/// Runs a command and returns its standard output.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    print_command(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(out.status.success(), "{program} failed ({})", out.status);
    String::from_utf8(out.stdout).with_context(|| format!("{program} printed non-UTF-8"))
}
