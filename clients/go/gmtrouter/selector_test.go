package gmtrouter

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	routerv1 "github.com/gmtrouter/gmtrouter/protos/gen/go/gmtrouter/v1"
)

// fakeRouter is an in-process RouterService whose behaviour each test sets.
type fakeRouter struct {
	routerv1.UnimplementedRouterServiceServer
	mu       sync.Mutex
	selects  []*routerv1.SelectRequest
	records  []*routerv1.RecordResponseRequest
	auth     []string
	delay    time.Duration
	answer   string // selected model; first candidate when ""
	failNext int    // RecordResponse answers UNAVAILABLE this many times
	keys     map[string]bool
	streams  int
	maxUsers int // StreamPreferences refuses more user ids (INVALID_ARGUMENT) like the service; 0: 1000
	stream   func(n int, req *routerv1.StreamPreferencesRequest, srv routerv1.RouterService_StreamPreferencesServer) error
}

func (f *fakeRouter) note(ctx context.Context) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.auth = append(f.auth, strings.Join(md.Get("authorization"), ","))
}

func (f *fakeRouter) Select(ctx context.Context, req *routerv1.SelectRequest) (*routerv1.SelectResponse, error) {
	f.mu.Lock()
	f.selects = append(f.selects, req)
	f.note(ctx)
	delay, answer := f.delay, f.answer
	f.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if answer == "" {
		answer = req.CandidateModels[0].Model
	}
	scores := map[string]float64{}
	for i, c := range req.CandidateModels {
		scores[c.Model] = -float64(i)
	}
	scores[answer] = 1
	return &routerv1.SelectResponse{
		SelectedModel: answer, Score: 1, Confidence: 0.7, Method: "bt_prior",
		AllScores: scores, Reasoning: "fake", InteractionId: "i-1", ModelVersion: "bt_prior@0",
	}, nil
}

func (f *fakeRouter) RecordResponse(ctx context.Context, req *routerv1.RecordResponseRequest) (*routerv1.RecordResponseResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.records = append(f.records, req)
	f.note(ctx)
	if f.failNext > 0 {
		f.failNext--
		return nil, status.Error(codes.Unavailable, "try again")
	}
	if f.keys == nil {
		f.keys = map[string]bool{}
	}
	dup := f.keys[req.IdempotencyKey]
	f.keys[req.IdempotencyKey] = true
	return &routerv1.RecordResponseResponse{InteractionId: "i-2", Duplicate: dup}, nil
}

func (f *fakeRouter) StreamPreferences(req *routerv1.StreamPreferencesRequest, srv routerv1.RouterService_StreamPreferencesServer) error {
	f.mu.Lock()
	f.streams++
	n, fn, limit := f.streams, f.stream, f.maxUsers
	f.mu.Unlock()
	if limit == 0 {
		limit = 1000 // the service's default limits.max_stream_users
	}
	if len(req.UserIds) > limit {
		return status.Errorf(codes.InvalidArgument, "user_ids: has %d entries; the limit is %d per stream", len(req.UserIds), limit)
	}
	if fn == nil {
		return status.Error(codes.Unimplemented, "no stream")
	}
	return fn(n, req, srv)
}

// startFake serves f on a free loopback port; it stops when the test ends.
func startFake(t *testing.T, f *fakeRouter, opts ...grpc.ServerOption) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	routerv1.RegisterRouterServiceServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

func newSelector(t *testing.T, target string, opts ...Option) *Selector {
	t.Helper()
	s, err := New(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

var twoModels = []ModelRef{{Model: "m-a", LoRAName: "lora-a", Weight: 0.5}, {Model: "m-b"}}

func TestSelectMapsRequestAndResult(t *testing.T) {
	f := &fakeRouter{answer: "m-a"}
	s := newSelector(t, startFake(t, f), WithSelectTimeout(5*time.Second))
	emb := []float32{0.1, 0.2, 0.3}
	res, err := s.Select(context.Background(), &SelectionContext{
		Query: "hi", QueryEmbedding: emb, ConversationHistory: []string{"earlier"},
		CandidateModels: twoModels, UserID: "u1", SessionID: "s1",
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.SelectedModel != "m-a" || res.LoRAName != "lora-a" || res.Method != "bt_prior" ||
		res.Confidence != 0.7 || res.Reasoning != "fake" || len(res.AllScores) != 2 ||
		res.InteractionID != "i-1" {
		t.Fatalf("unexpected result %+v", res)
	}
	req := f.selects[0]
	if req.UserId != "u1" || req.SessionId != "s1" || req.Query != "hi" ||
		len(req.QueryEmbedding) != 3 || req.QueryEmbedding[2] != 0.3 ||
		req.ConversationHistory[0] != "earlier" || req.CandidateModels[0].LoraName != "lora-a" {
		t.Fatalf("unexpected request %v", req)
	}
	if s.Method() != "gmtrouter" {
		t.Fatal(s.Method())
	}
}

func TestSelectRejectsInvalidRequests(t *testing.T) {
	s := newSelector(t, "127.0.0.1:1")
	for _, sc := range []*SelectionContext{
		nil,
		{Query: "q", UserID: "u"},
		{Query: "q", UserID: "u", CandidateModels: []ModelRef{{Model: "a"}, {Model: " "}}},
	} {
		if _, err := s.Select(context.Background(), sc); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%+v: got %v, want ErrInvalidRequest", sc, err)
		}
	}
}

func assertFallback(t *testing.T, res *SelectionResult, err error, reason string) {
	t.Helper()
	if err != nil {
		t.Fatalf("fallback must not be an error: %v", err)
	}
	if res.SelectedModel != "m-a" || res.LoRAName != "lora-a" || res.Method != FallbackMethod {
		t.Fatalf("not a first-candidate fallback: %+v", res)
	}
	if !strings.Contains(res.Reasoning, reason) {
		t.Fatalf("reasoning %q does not mention %q", res.Reasoning, reason)
	}
}

func TestSelectFallsBackWithinDeadline(t *testing.T) {
	f := &fakeRouter{delay: 2 * time.Second}
	s := newSelector(t, startFake(t, f)) // default 50 ms
	sc := &SelectionContext{Query: "q", UserID: "u", CandidateModels: twoModels}
	start := time.Now()
	res, err := s.Select(context.Background(), sc)
	took := time.Since(start)
	assertFallback(t, res, err, "did not answer within 50ms")
	if took > DefaultSelectTimeout+400*time.Millisecond {
		t.Fatalf("fallback took %s", took)
	}
	if st := s.Stats(); st.Selects != 1 || st.Fallbacks != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestSelectFallsBackWhenNothingListens(t *testing.T) {
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := lis.Addr().String()
	_ = lis.Close()
	s := newSelector(t, addr)
	start := time.Now()
	res, err := s.Select(context.Background(), &SelectionContext{Query: "q", UserID: "u", CandidateModels: twoModels})
	assertFallback(t, res, err, "gmtrouter service")
	if time.Since(start) > DefaultSelectTimeout+400*time.Millisecond {
		t.Fatalf("fallback took %s", time.Since(start))
	}
}

func TestSelectFallsBackOnForeignAnswerAndMissingUser(t *testing.T) {
	f := &fakeRouter{answer: "not-a-candidate"}
	s := newSelector(t, startFake(t, f), WithSelectTimeout(5*time.Second))
	res, err := s.Select(context.Background(), &SelectionContext{Query: "q", UserID: "u", CandidateModels: twoModels})
	assertFallback(t, res, err, "not a candidate")
	res, err = s.Select(context.Background(), &SelectionContext{Query: "q", CandidateModels: twoModels})
	assertFallback(t, res, err, "no user id")
	if len(f.selects) != 1 {
		t.Fatalf("a request without a user id must not be sent; sent %d", len(f.selects))
	}
	f.answer = "lora-a" // matched by LoRA name
	anon := newSelector(t, startFake(t, f), WithSelectTimeout(5*time.Second), WithAnonymousUser("anonymous"))
	res, err = anon.Select(context.Background(), &SelectionContext{Query: "q", CandidateModels: twoModels})
	if err != nil || res.SelectedModel != "m-a" || f.selects[1].UserId != "anonymous" {
		t.Fatalf("%+v %v", res, err)
	}
}

func TestValidateFeedback(t *testing.T) {
	ok := Feedback{Query: "q", UserID: "u", WinnerModel: "a", LoserModel: "b", Confidence: 0.5}
	if err := ValidateFeedback(&ok); err != nil {
		t.Fatal(err)
	}
	bad := map[string]Feedback{
		"no winner or loser": {Query: "q", UserID: "u"},
		"winner == loser":    {Query: "q", UserID: "u", WinnerModel: "a", LoserModel: "a"},
		"tie with one model": {Query: "q", UserID: "u", WinnerModel: "a", Tie: true},
		"confidence > 1":     {Query: "q", UserID: "u", WinnerModel: "a", Confidence: 1.5},
		"confidence < 0":     {Query: "q", UserID: "u", WinnerModel: "a", Confidence: -0.1},
		"confidence NaN":     {Query: "q", UserID: "u", WinnerModel: "a", Confidence: math.NaN()},
		"no query":           {UserID: "u", WinnerModel: "a"},
	}
	for name, fb := range bad {
		if err := ValidateFeedback(&fb); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%s: got %v", name, err)
		}
	}
	if err := ValidateFeedback(nil); !errors.Is(err, ErrInvalidRequest) {
		t.Error("nil feedback accepted")
	}
}

func TestFeedbackKeyIsDeterministic(t *testing.T) {
	a := Feedback{Query: "q", UserID: "u", WinnerModel: "a", LoserModel: "b", Timestamp: 100}
	b := a
	if FeedbackKey(&a) != FeedbackKey(&b) {
		t.Fatal("same feedback, different keys")
	}
	for _, change := range []func(*Feedback){
		func(f *Feedback) { f.Timestamp = 101 },
		func(f *Feedback) { f.WinnerModel, f.LoserModel = "b", "a" },
		func(f *Feedback) { f.Tie = true },
		func(f *Feedback) { f.UserID = "u2" },
		func(f *Feedback) { f.Query, f.Response = "q1", "" }, // fields are length-prefixed
		func(f *Feedback) { f.TurnIndex = 1 },
	} {
		c := a
		change(&c)
		if FeedbackKey(&c) == FeedbackKey(&a) {
			t.Errorf("changed feedback %+v kept the key", c)
		}
	}
}

func TestUpdateFeedbackMapping(t *testing.T) {
	f := &fakeRouter{}
	s := newSelector(t, startFake(t, f))
	ctx := context.Background()
	fbs := []Feedback{
		{Query: "q", Response: "r", UserID: "u", SessionID: "s", TurnIndex: 2, WinnerModel: "a", LoserModel: "b", Timestamp: 1700000000},
		{Query: "q", UserID: "u", ConversationID: "c", WinnerModel: "a", LoserModel: "b", Tie: true, Timestamp: 1700000001},
		{Query: "q", UserID: "u", WinnerModel: "a", FeedbackType: "satisfied"},
		{Query: "q", UserID: "u", LoserModel: "b", FeedbackType: "wrong_answer"},
	}
	for i := range fbs {
		if err := s.UpdateFeedback(ctx, &fbs[i]); err != nil {
			t.Fatal(err)
		}
	}
	cmp := f.records[0]
	if cmp.UserId != "u" || cmp.SessionId != "s" || cmp.TurnIndex != 2 || cmp.Query != "q" || cmp.Response != "r" ||
		cmp.Model != "a" || cmp.GetComparison().GetWinnerModel() != "a" ||
		cmp.GetComparison().GetLoserModel() != "b" || cmp.GetComparison().GetTie() ||
		cmp.GetTimestamp().GetSeconds() != 1700000000 || cmp.IdempotencyKey != FeedbackKey(&fbs[0]) {
		t.Fatalf("comparison mapped to %v", cmp)
	}
	if tie := f.records[1]; !tie.GetComparison().GetTie() || tie.SessionId != "c" {
		t.Fatalf("tie mapped to %v", tie)
	}
	if w := f.records[2]; w.Model != "a" || w.GetRating().GetValue() != 1 || w.GetRating().GetScaleMax() != 1 ||
		time.Since(w.GetTimestamp().AsTime()) > time.Minute {
		t.Fatalf("winner-only mapped to %v", w)
	}
	if l := f.records[3]; l.Model != "b" || l.GetRating() == nil || l.GetRating().GetValue() != 0 {
		t.Fatalf("loser-only mapped to %v", l)
	}
	// A resend of the same feedback is a duplicate, not an error.
	if err := s.UpdateFeedback(ctx, &fbs[0]); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.DuplicateFeedbacks != 1 || st.Feedbacks != 5 {
		t.Fatalf("stats %+v", st)
	}
	if err := s.UpdateFeedback(ctx, &Feedback{Query: "q", WinnerModel: "a"}); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("feedback without user: %v", err)
	}
}

func TestUpdateFeedbackRetriesUnavailableWithSameKey(t *testing.T) {
	f := &fakeRouter{failNext: 1}
	s := newSelector(t, startFake(t, f))
	fb := &Feedback{Query: "q", UserID: "u", WinnerModel: "a", LoserModel: "b", Timestamp: 5}
	if err := s.UpdateFeedback(context.Background(), fb); err != nil {
		t.Fatal(err)
	}
	if len(f.records) != 2 || f.records[0].IdempotencyKey != f.records[1].IdempotencyKey {
		t.Fatalf("want 2 attempts with one key, got %d", len(f.records))
	}
	f.failNext = 10
	if err := s.UpdateFeedback(context.Background(), fb); status.Code(errors.Unwrap(err)) != codes.Unavailable {
		t.Fatalf("persistent outage: got %v", err)
	}
}

func TestBearerTokenNeedsTLSUnlessAllowed(t *testing.T) {
	if _, err := New("127.0.0.1:1", WithBearerToken("x")); err == nil {
		t.Fatal("a token over plaintext must be refused")
	}
	f := &fakeRouter{}
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokFile, []byte("secret-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := newSelector(t, startFake(t, f), WithBearerTokenFile(tokFile), WithInsecureToken(), WithSelectTimeout(5*time.Second))
	if _, err := s.Select(context.Background(), &SelectionContext{Query: "q", UserID: "u", CandidateModels: twoModels}); err != nil {
		t.Fatal(err)
	}
	if f.auth[0] != "Bearer secret-1" {
		t.Fatalf("authorization %q", f.auth[0])
	}
}

// writeSelfSigned writes a CA-less self-signed certificate for "gmtrouter.test".
func writeSelfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "gmtrouter.test"},
		DNSNames: []string{"gmtrouter.test"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestTLSAndBearerToken(t *testing.T) {
	certFile, keyFile := writeSelfSigned(t, t.TempDir())
	creds, err := credentials.NewServerTLSFromFile(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeRouter{}
	addr := startFake(t, f, grpc.Creds(creds))
	s := newSelector(t, addr, WithTLS(TLSFiles{CAFile: certFile, ServerName: "gmtrouter.test"}),
		WithBearerToken("tok"), WithSelectTimeout(5*time.Second))
	res, err := s.Select(context.Background(), &SelectionContext{Query: "q", UserID: "u", CandidateModels: twoModels})
	if err != nil || res.Method == FallbackMethod {
		t.Fatalf("TLS select failed: %+v %v", res, err)
	}
	if f.auth[0] != "Bearer tok" {
		t.Fatalf("authorization %q", f.auth[0])
	}
	if _, err := New(addr, WithTLS(TLSFiles{CAFile: filepath.Join(t.TempDir(), "missing.pem")})); err == nil {
		t.Fatal("a missing CA file must fail New")
	}
}

func TestPreferenceCacheReconnectsAndFollows(t *testing.T) {
	f := &fakeRouter{}
	send := func(srv routerv1.RouterService_StreamPreferencesServer, user string, version uint64, order ...string) error {
		upd := &routerv1.PreferenceUpdate{UserId: user, Version: version, Method: "bt_prior"}
		for i, m := range order {
			upd.Preferences = append(upd.Preferences, &routerv1.ModelPreference{Model: m, Score: -float64(i)})
		}
		return srv.Send(upd)
	}
	f.stream = func(n int, req *routerv1.StreamPreferencesRequest, srv routerv1.RouterService_StreamPreferencesServer) error {
		switch n {
		case 1: // first connection: one ranking, then the server goes away
			if err := send(srv, "u1", 1, "m-a", "m-b"); err != nil {
				return err
			}
			return status.Error(codes.Unavailable, "server restarting")
		default: // later connections: the ranking flipped; stay open
			for _, u := range req.UserIds {
				if err := send(srv, u, uint64(n), "m-b", "m-a"); err != nil {
					return err
				}
			}
			<-srv.Context().Done()
			return nil
		}
	}
	s := newSelector(t, startFake(t, f), WithStreamBackoff(10*time.Millisecond, 50*time.Millisecond))
	updates := make(chan Preference, 16)
	cache, err := s.WatchPreferences(context.Background(), []string{"u1"}, twoModels, func(p Preference) { updates <- p })
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	waitFor := func(user, best string) {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case p := <-updates:
				if p.UserID == user && p.Ranking[0].Model == best {
					return
				}
			case <-deadline:
				t.Fatalf("no update with %s first for %s", best, user)
			}
		}
	}
	waitFor("u1", "m-a")
	waitFor("u1", "m-b") // after the reconnect
	if r, ok := cache.Ranking("u1"); !ok || r[0].Model != "m-b" || !cache.Connected() {
		t.Fatalf("cache %v %v connected=%v", r, ok, cache.Connected())
	}
	if _, ok := cache.Ranking("u2"); ok {
		t.Fatal("u2 is not followed yet")
	}
	cache.Follow("u2", "u1")
	waitFor("u2", "m-b")
	if p, ok := cache.Preference("u2"); !ok || p.Method != "bt_prior" {
		t.Fatalf("u2 preference %+v", p)
	}
	if _, err := s.WatchPreferences(context.Background(), nil, twoModels, nil); !errors.Is(err, ErrInvalidRequest) {
		t.Fatal("a watch of no users must be refused")
	}
}

// routerSelector is the method set a Go router's selection registry calls (Select,
// UpdateFeedback, Method), with this package's types standing in for the router's.
type routerSelector interface {
	Select(ctx context.Context, sc *SelectionContext) (*SelectionResult, error)
	UpdateFeedback(ctx context.Context, fb *Feedback) error
	Method() string
}

var _ routerSelector = (*Selector)(nil)

// A target that resolves to several addresses (a headless Service's DNS name) gets its calls
// spread over all of them (round_robin), not pinned to the first (grpc's pick_first default).
func TestSelectSpreadsOverEveryResolvedAddress(t *testing.T) {
	fa, fb := &fakeRouter{}, &fakeRouter{}
	r := manual.NewBuilderWithScheme("gmtrouter-test")
	r.InitialState(resolver.State{Addresses: []resolver.Address{
		{Addr: startFake(t, fa)}, {Addr: startFake(t, fb)},
	}})
	s := newSelector(t, r.Scheme()+":///replicas", WithDialOptions(grpc.WithResolvers(r)))
	ctx := context.Background()
	for i := 0; i < 40; i++ {
		res, err := s.Select(ctx, &SelectionContext{Query: "q", UserID: "u", CandidateModels: twoModels})
		if err != nil || res.Method == FallbackMethod {
			t.Fatalf("select %d: %v %+v", i, err, res)
		}
	}
	fa.mu.Lock()
	na := len(fa.selects)
	fa.mu.Unlock()
	fb.mu.Lock()
	nb := len(fb.selects)
	fb.mu.Unlock()
	if na+nb != 40 || na < 10 || nb < 10 {
		t.Fatalf("calls per replica: %d and %d", na, nb)
	}
}
