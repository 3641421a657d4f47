//! Authenticating a proxy: its projected service-account token goes to the apiserver in a
//! TokenReview for audience [`AUDIENCE`]; the reviewed user must be a service account.
//! The apiserver does the signature, expiry, audience and revocation checks; this module
//! only reads the answer ([`interpret`], pure).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

use super::identity::{IdentityError, ServiceAccountId};

/// The audience a proxy's projected token must be minted for.
pub const AUDIENCE: &str = "remora";

/// Tokens longer than this are refused without asking the apiserver.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token does not authenticate a service account.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no token: send it as \"token\" in the body or as Authorization: Bearer")]
    Missing,
    #[error("the token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("the token has expired: {0}")]
    Expired(String),
    #[error("the token is not valid for audience \"{AUDIENCE}\": {0}")]
    WrongAudience(String),
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    NotServiceAccount(#[source] IdentityError),
    #[error("the TokenReview failed: {0}")]
    Review(#[source] kube::Error),
}

/// Reads a TokenReview's status. An unauthenticated answer is classified as expired or
/// wrong-audience from the apiserver's message where it says so (for the reason label
/// and message only: every unauthenticated answer is refused). An authenticated answer must
/// list [`AUDIENCE`] among its audiences: an authenticator that does not check audiences
/// returns none, and is not trusted.
pub fn interpret(status: Option<&TokenReviewStatus>) -> Result<ServiceAccountId, TokenError> {
    let Some(status) = status else {
        return Err(TokenError::Invalid(
            "the TokenReview has no status".to_owned(),
        ));
    };
    if status.authenticated != Some(true) {
        let msg = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".to_owned());
        return Err(if msg.contains("expired") {
            TokenError::Expired(msg)
        } else if msg.contains("audience") {
            TokenError::WrongAudience(msg)
        } else {
            TokenError::Invalid(msg)
        });
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(TokenError::WrongAudience(format!(
            "the authenticator confirmed audiences {audiences:?}"
        )));
    }
    let user = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    ServiceAccountId::from_username(user).map_err(TokenError::NotServiceAccount)
}

/// What is checked before a token is sent to the apiserver (pure): present, and not
/// longer than [`MAX_TOKEN_LEN`].
pub fn precheck(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    Ok(())
}

/// Sends TokenReviews with the operator's client (RBAC: `tokenreviews` `create`).
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer").finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    /// Who `token` authenticates, for audience [`AUDIENCE`].
    pub async fn review(&self, token: &str) -> Result<ServiceAccountId, TokenError> {
        precheck(token)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(TokenError::Review)?;
        interpret(answer.status.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(ok: bool, error: Option<&str>, aud: &[&str], user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(ok),
            error: error.map(str::to_owned),
            audiences: Some(aud.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                ..UserInfo::default()
            }),
        }
    }

    #[test]
    fn an_authenticated_service_account_is_its_identity() {
        let s = status(true, None, &["remora"], "system:serviceaccount:shop:a");
        let id = interpret(Some(&s)).expect("authenticated");
        assert_eq!((id.namespace(), id.name()), ("shop", "a"));
    }

    #[test]
    fn refusals_are_classified() {
        let expired = status(
            false,
            Some(
                "[invalid bearer token, square/go-jose/jwt: validation failed, token is expired (exp)]",
            ),
            &[],
            "",
        );
        assert!(matches!(
            interpret(Some(&expired)),
            Err(TokenError::Expired(_))
        ));
        let aud = status(
            false,
            Some(
                "[invalid bearer token, token audiences [\"other\"] is invalid for the target audiences [\"remora\"]]",
            ),
            &[],
            "",
        );
        assert!(matches!(
            interpret(Some(&aud)),
            Err(TokenError::WrongAudience(_))
        ));
        let bad = status(false, Some(""), &[], "");
        assert!(
            matches!(interpret(Some(&bad)), Err(TokenError::Invalid(m)) if m == "not authenticated")
        );
        assert!(matches!(interpret(None), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn an_audience_unaware_authenticator_is_not_trusted() {
        let s = status(true, None, &[], "system:serviceaccount:shop:a");
        assert!(matches!(
            interpret(Some(&s)),
            Err(TokenError::WrongAudience(_))
        ));
        let s = status(true, None, &["other"], "system:serviceaccount:shop:a");
        assert!(matches!(
            interpret(Some(&s)),
            Err(TokenError::WrongAudience(_))
        ));
    }

    #[test]
    fn users_that_are_not_service_accounts_are_refused() {
        let s = status(true, None, &["remora"], "system:admin");
        assert!(matches!(
            interpret(Some(&s)),
            Err(TokenError::NotServiceAccount(_))
        ));
    }
}
