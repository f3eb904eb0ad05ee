//! `GET /playground`: the playground and labeling page. One self-contained
//! HTML file (no CDN, no build step) compiled into the binary.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("../../static/playground.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // The page talks only to this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
            ),
        ],
        PAGE,
    )
}
