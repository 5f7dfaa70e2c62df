//! `troupe token`: API bearer tokens, signed with the key `troupe certs init` made.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use troupe_transport::token::{self, SigningKey, SIGNING_KEY_FILE};
use troupe_transport::{Role, TokenPolicy};

use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make the signing key (jwt-signing.key) and add its public key to jwks.json, in a
    /// certificate directory made before tokens existed. `troupe certs init` already does
    /// this; an existing key is never replaced (that is `rotate`).
    Init(KeysArgs),
    /// Print a token for ROLE, signed with DIR/jwt-signing.key. Nodes accept it while its
    /// key is in their jwks.json.
    Issue(IssueArgs),
    /// Make a new signing key. Its public key joins jwks.json next to the old one, so tokens
    /// already issued keep working; nodes pick the file up within seconds (or on SIGHUP).
    Rotate(KeysArgs),
    /// Remove a key from jwks.json: every token signed with it stops working once nodes
    /// reload the file.
    Retire(RetireArgs),
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// A directory made by `troupe certs init` (jwt-signing.key, jwks.json).
    #[arg(long, value_name = "DIR")]
    pub keys: PathBuf,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[command(flatten)]
    pub keys: KeysArgs,
    /// read (status, lists, watch), infer (+ Embed), operator (+ metadata writes, push,
    /// activate, actor restart) or admin (+ membership, cluster init).
    #[arg(long)]
    pub role: Role,
    /// How long the token is valid: 90s, 30m, 12h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Who the token is for (its `sub`), shown in the nodes' logs.
    #[arg(long, default_value = "troupe-cli")]
    pub subject: String,
    /// The `iss` to sign (the nodes' [auth] issuer).
    #[arg(long, default_value = token::DEFAULT_ISSUER)]
    pub issuer: String,
    /// The `aud` to sign (the nodes' [auth] audience).
    #[arg(long, default_value = token::DEFAULT_AUDIENCE)]
    pub audience: String,
}

#[derive(Debug, Args)]
pub struct RetireArgs {
    #[command(flatten)]
    pub keys: KeysArgs,
    /// The key id to remove (`troupe token rotate` prints it).
    #[arg(long)]
    pub kid: String,
}

/// `90s`, `30m`, `12h`, `7d`; at most 366 days.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: use a number and a unit, e.g. 30m, 12h or 7d"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number.saturating_mul(60),
        "h" | "" => number.saturating_mul(3600),
        "d" => number.saturating_mul(86_400),
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    if seconds == 0 || seconds > 366 * 86_400 {
        return Err(format!("{text:?}: a token lives from 1 second to 366 days"));
    }
    Ok(Duration::from_secs(seconds))
}

pub fn run(command: TokenCommand) -> Result<(), CliError> {
    let usage = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
    match command {
        TokenCommand::Issue(args) => {
            let key =
                SigningKey::load(&args.keys.keys.join(SIGNING_KEY_FILE)).map_err(|e| usage(&e))?;
            let policy = TokenPolicy {
                issuer: args.issuer,
                audience: args.audience,
                ..TokenPolicy::default()
            };
            let token = key
                .issue(&policy, &args.subject, args.role, args.ttl)
                .map_err(|e| usage(&e))?;
            println!("{token}");
        }
        TokenCommand::Init(args) => {
            for path in token::init_signing_key(&args.keys).map_err(|e| usage(&e))? {
                println!("{}", path.display());
            }
        }
        TokenCommand::Rotate(args) => {
            let (old, new) = token::rotate_signing_key(&args.keys).map_err(|e| usage(&e))?;
            println!("new signing key: {new}");
            println!("old key still accepted: {old} (retire it with `troupe token retire --keys {} --kid {old}` once its tokens have expired)", args.keys.display());
        }
        TokenCommand::Retire(args) => {
            token::retire_key(&args.keys.keys, &args.kid).map_err(|e| usage(&e))?;
            println!("retired {}", args.kid);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;
    use std::time::Duration;

    #[test]
    fn ttls_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        for bad in ["", "0s", "h", "5w", "999d", "-1h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
