//! The review page at `/ui`: static files compiled into the binary (`src/api/ui/`), served
//! without auth. The page itself asks for the admin key and sends it to the admin API, so
//! nothing here is secret. No CDN, no inline script or style: the Content-Security-Policy
//! allows this origin only. The review logic lives in the admin API, not here.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use super::error::{ApiError, ErrorKind};

/// Nothing but this origin: scripts, styles, images and API calls all come from the gateway.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset { name: "index.html", content_type: "text/html; charset=utf-8", body: include_bytes!("ui/index.html") },
    Asset { name: "app.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("ui/app.js") },
    Asset { name: "app.css", content_type: "text/css; charset=utf-8", body: include_bytes!("ui/app.css") },
    Asset { name: "favicon.svg", content_type: "image/svg+xml", body: include_bytes!("ui/favicon.svg") },
];

/// `GET /ui` and `GET /ui/`.
pub async fn index(req: HttpRequest) -> HttpResponse {
    serve(&req, "index.html")
}

/// `GET /ui/{file}`.
pub async fn asset(req: HttpRequest, file: web::Path<String>) -> HttpResponse {
    serve(&req, &file)
}

fn serve(req: &HttpRequest, name: &str) -> HttpResponse {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return actix_web::ResponseError::error_response(&ApiError::new(
            ErrorKind::UnknownUrl,
            format!("Invalid URL ({} {}).", req.method(), req.path()),
        ));
    };
    // The file names are not fingerprinted, so the browser revalidates every time (`no-cache`)
    // and the ETag makes that a 304 until the binary changes.
    let etag = format!("\"{}\"", &hex::encode(Sha256::digest(asset.body))[..20]);
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut res = if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    res.insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .insert_header((header::ETAG, etag))
        .insert_header((header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .insert_header((header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")))
        .insert_header((header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")));
    if fresh {
        return res.finish();
    }
    res.content_type(asset.content_type).body(asset.body)
}

#[cfg(test)]
mod tests {
    use actix_web::{test as atest, App};

    use super::*;

    fn app() -> App<
        impl actix_web::dev::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse,
            Error = actix_web::Error,
            InitError = (),
        >,
    > {
        App::new()
            .route("/ui", web::get().to(index))
            .route("/ui/", web::get().to(index))
            .route("/ui/{file}", web::get().to(asset))
    }

    fn header(res: &actix_web::dev::ServiceResponse, name: header::HeaderName) -> &str {
        res.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    #[actix_web::test]
    async fn serves_each_asset_with_its_type_and_the_policy() -> anyhow::Result<()> {
        let app = atest::init_service(app()).await;
        for (path, ty) in [
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/app.css", "text/css"),
            ("/ui/favicon.svg", "image/svg+xml"),
        ] {
            let res = atest::call_service(&app, atest::TestRequest::get().uri(path).to_request()).await;
            assert_eq!(res.status(), 200, "{path}");
            assert!(header(&res, header::CONTENT_TYPE).starts_with(ty), "{path}");
            assert_eq!(header(&res, header::CACHE_CONTROL), "no-cache", "{path}");
            assert_eq!(header(&res, header::CONTENT_SECURITY_POLICY), CONTENT_SECURITY_POLICY, "{path}");
            assert_eq!(header(&res, header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
            assert!(!atest::read_body(res).await.is_empty(), "{path}");
        }
        Ok(())
    }

    #[actix_web::test]
    async fn the_etag_answers_304_and_unknown_files_404() -> anyhow::Result<()> {
        let app = atest::init_service(app()).await;
        let res = atest::call_service(&app, atest::TestRequest::get().uri("/ui/app.js").to_request()).await;
        let etag = header(&res, header::ETAG).to_string();
        assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
        let req = atest::TestRequest::get().uri("/ui/app.js").insert_header((header::IF_NONE_MATCH, etag)).to_request();
        let res = atest::call_service(&app, req).await;
        assert_eq!(res.status(), 304);
        assert!(atest::read_body(res).await.is_empty());

        let res = atest::call_service(&app, atest::TestRequest::get().uri("/ui/secret.txt").to_request()).await;
        assert_eq!(res.status(), 404);
        let body: serde_json::Value = atest::read_body_json(res).await;
        assert_eq!(body["error"]["code"], "unknown_url");
        Ok(())
    }

    /// The policy allows no inline code, so the page must not carry any.
    #[test]
    fn the_page_has_no_inline_script_style_or_external_origin() -> anyhow::Result<()> {
        let handler = regex::Regex::new(r"\son[a-z]+\s*=")?;
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".html")) {
            let html = String::from_utf8_lossy(a.body);
            assert!(!html.contains("<style"), "{}", a.name);
            assert!(!html.contains(" style="), "{}", a.name);
            assert!(!handler.is_match(&html), "{}: inline event handler", a.name);
            for tag in html.split("<script").skip(1) {
                assert!(tag.trim_start().starts_with("src=\"/ui/"), "{}: inline script", a.name);
            }
            assert!(!html.contains("http://") && !html.contains("https://"), "{}", a.name);
        }
        Ok(())
    }
}
