package gmtrouter

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"
)

func (f TLSFiles) credentials() (credentials.TransportCredentials, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: f.ServerName}
	if f.CAFile != "" {
		pem, err := os.ReadFile(f.CAFile)
		if err != nil {
			return nil, fmt.Errorf("gmtrouter: reading CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("gmtrouter: no PEM certificate in CA file %s", f.CAFile)
		}
		cfg.RootCAs = pool
	}
	if (f.CertFile == "") != (f.KeyFile == "") {
		return nil, errors.New("gmtrouter: TLS CertFile and KeyFile must be given together")
	}
	if f.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("gmtrouter: loading client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return credentials.NewTLS(cfg), nil
}

type tokenSource interface {
	token() (string, error)
}

type staticToken string

func (t staticToken) token() (string, error) { return string(t), nil }

// fileToken re-reads the file when its modification time changes.
type fileToken struct {
	path  string
	mu    sync.Mutex
	mtime time.Time
	value string
}

func (f *fileToken) token() (string, error) {
	st, err := os.Stat(f.path)
	if err != nil {
		return "", fmt.Errorf("gmtrouter: bearer token file: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !st.ModTime().Equal(f.mtime) || f.value == "" {
		b, err := os.ReadFile(f.path)
		if err != nil {
			return "", fmt.Errorf("gmtrouter: bearer token file: %w", err)
		}
		f.value = strings.TrimSpace(string(b))
		f.mtime = st.ModTime()
	}
	return f.value, nil
}

// bearer implements credentials.PerRPCCredentials.
type bearer struct {
	src        tokenSource
	requireTLS bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := b.src.token()
	if err != nil {
		return nil, err
	}
	if tok == "" {
		return nil, errors.New("gmtrouter: empty bearer token")
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.requireTLS }
