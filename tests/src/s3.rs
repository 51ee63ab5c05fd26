//! An S3-compatible object store on loopback for tests: moto's server, installed by
//! scripts/s3-env into a cached venv. Its credentials are `test`/`test`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use llmops_operator::StoreConfig;

use crate::{eventually, repo_root};

/// An S3-compatible store on loopback (moto's server, from scripts/s3-env), stopped on drop.
pub struct S3Server {
    child: std::process::Child,
    /// http://127.0.0.1:PORT
    pub endpoint: String,
}

impl S3Server {
    /// Starts a server on a free port of 127.0.0.1.
    pub async fn start() -> Result<Self> {
        let script = repo_root().join("scripts/s3-env");
        let out = std::process::Command::new(&script).stderr(std::process::Stdio::inherit()).output()?;
        if !out.status.success() {
            bail!("{} failed", script.display());
        }
        let server = String::from_utf8(out.stdout)?.lines().last().context("no moto_server path")?.trim().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = std::process::Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let addr = format!("127.0.0.1:{port}");
        eventually("the S3 server to listen", Duration::from_secs(60), || async {
            Ok(tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()))
        })
        .await?;
        Ok(Self { child, endpoint })
    }

    /// A client of one bucket, with the server's test credentials.
    pub fn bucket(&self, name: &str) -> Result<object_store::aws::AmazonS3> {
        Ok(object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(name)
            .with_endpoint(&self.endpoint)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_allow_http(true)
            .build()?)
    }

    /// The operator's store setting for a bucket of this server, under prefix `llmops`.
    pub fn store_config(&self, bucket: &str) -> StoreConfig {
        StoreConfig::S3 {
            bucket: bucket.into(),
            prefix: "llmops".into(),
            endpoint: self.endpoint.clone(),
            region: "us-east-1".into(),
            allow_http: true,
            credentials_secret: None,
        }
    }

    /// Creates a bucket (S3's CreateBucket: an empty PUT on /NAME).
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.endpoint.trim_start_matches("http://")).await?;
        let request =
            format!("PUT /{name} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        if !response.starts_with("HTTP/1.1 200") {
            bail!("creating bucket {name}: {response}");
        }
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
