package gmtrouter

import (
	"log/slog"
	"time"

	"google.golang.org/grpc"
)

// Default deadlines.
const (
	DefaultSelectTimeout   = 50 * time.Millisecond
	DefaultFeedbackTimeout = 2 * time.Second
)

// DefaultMaxStreamUsers is the default number of user ids per preference stream: the
// service's default limits.max_stream_users.
const DefaultMaxStreamUsers = 1000

type options struct {
	selectTimeout   time.Duration
	feedbackTimeout time.Duration
	tls             *TLSFiles
	token           tokenSource
	insecureToken   bool
	anonymousUser   string
	dialOptions     []grpc.DialOption
	logger          *slog.Logger
	backoffMin      time.Duration
	backoffMax      time.Duration
	maxStreamUsers  int
}

func defaultOptions() options {
	return options{
		selectTimeout:   DefaultSelectTimeout,
		feedbackTimeout: DefaultFeedbackTimeout,
		logger:          slog.New(slog.DiscardHandler),
		backoffMin:      100 * time.Millisecond,
		backoffMax:      10 * time.Second,
		maxStreamUsers:  DefaultMaxStreamUsers,
	}
}

// Option configures a Selector.
type Option func(*options)

// WithSelectTimeout sets the deadline of each Select call (default 50 ms). A shorter
// deadline already on the caller's context wins.
func WithSelectTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.selectTimeout = d
		}
	}
}

// WithFeedbackTimeout sets the deadline of each UpdateFeedback call, retries included
// (default 2 s).
func WithFeedbackTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.feedbackTimeout = d
		}
	}
}

// TLSFiles names PEM files for a TLS connection. CAFile verifies the server (system roots
// when empty); CertFile and KeyFile, both or neither, are the client certificate for mTLS.
// ServerName overrides the name checked against the server certificate.
type TLSFiles struct {
	CAFile     string
	CertFile   string
	KeyFile    string
	ServerName string
}

// WithTLS connects over TLS with credentials read from files (plaintext otherwise).
func WithTLS(files TLSFiles) Option {
	return func(o *options) { f := files; o.tls = &f }
}

// WithBearerToken sends "authorization: Bearer TOKEN" on every call. The token is only
// sent over TLS unless WithInsecureToken is also given.
func WithBearerToken(token string) Option {
	return func(o *options) { o.token = staticToken(token) }
}

// WithBearerTokenFile is WithBearerToken with the token read from a file (re-read when the
// file changes, e.g. a rotated Kubernetes secret).
func WithBearerTokenFile(path string) Option {
	return func(o *options) { o.token = &fileToken{path: path} }
}

// WithInsecureToken allows the bearer token over a plaintext connection (only for a
// loopback address or a mesh that encrypts for you).
func WithInsecureToken() Option {
	return func(o *options) { o.insecureToken = true }
}

// WithAnonymousUser sets the user id used when a request carries none. Without it such a
// Select falls back to the first candidate and such feedback is rejected.
func WithAnonymousUser(userID string) Option {
	return func(o *options) { o.anonymousUser = userID }
}

// WithDialOptions appends gRPC dial options (keepalive, interceptors, a custom dialer…).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOptions = append(o.dialOptions, opts...) }
}

// WithLogger logs fallbacks, feedback failures and stream reconnects (silent by default).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// WithStreamBackoff sets the reconnect backoff of preference streams (default 100 ms
// doubling up to 10 s, with jitter).
func WithStreamBackoff(minDelay, maxDelay time.Duration) Option {
	return func(o *options) {
		if minDelay > 0 {
			o.backoffMin = minDelay
		}
		if maxDelay >= o.backoffMin {
			o.backoffMax = maxDelay
		}
	}
}

// WithMaxStreamUsers sets how many user ids one preference stream carries at most (default
// 1000, the service's default limits.max_stream_users). A PreferenceCache following more
// users opens several streams. Keep it at or below the service's limit: a larger stream is
// refused with INVALID_ARGUMENT, logged as an error and retried only at the longest backoff.
func WithMaxStreamUsers(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.maxStreamUsers = n
		}
	}
}
