package gmtrouter

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// realServer is `gmtrouter serve` (the Python service) on the embedded SQLite store.
type realServer struct {
	addr string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().(*net.TCPAddr).Port
}

// startRealServer starts the service from GMTROUTER_BIN or <repo>/.venv/bin/gmtrouter and
// waits for grpc.health.v1 SERVING. Without the binary the test is skipped, except under
// CI=true, where that is a failure.
func startRealServer(t *testing.T) *realServer {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: not starting the Python service")
	}
	bin := os.Getenv("GMTROUTER_BIN")
	if bin == "" {
		bin = filepath.Join(repoRoot(t), ".venv", "bin", "gmtrouter")
	}
	if _, err := os.Stat(bin); err != nil {
		msg := fmt.Sprintf("the Python service is not installed (%s: %v); run `make install` "+
			"or set GMTROUTER_BIN", bin, err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	work := t.TempDir()
	cfg := filepath.Join(work, "config.yaml")
	// A short poll interval keeps the stream test quick; JSON logs for the failure dump.
	if err := os.WriteFile(cfg, []byte("logging: {format: json, level: info}\nstreaming: {poll_interval_s: 0.2}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	srv := &realServer{addr: fmt.Sprintf("127.0.0.1:%d", port), log: filepath.Join(work, "server.log"), done: make(chan struct{})}
	logf, err := os.Create(srv.log)
	if err != nil {
		t.Fatal(err)
	}
	srv.cmd = exec.Command(bin, "serve", "--config", cfg, "--store", "sqlite:///"+filepath.Join(work, "graph.db"),
		"--port", fmt.Sprint(port), "--host", "127.0.0.1")
	srv.cmd.Dir = work
	srv.cmd.Stdout, srv.cmd.Stderr = logf, logf
	srv.cmd.Env = append(os.Environ(), "PYTHONUNBUFFERED=1")
	if err := srv.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.cmd.Wait(); _ = logf.Close(); close(srv.done) }()
	t.Cleanup(func() { srv.stop(syscall.SIGTERM) })

	start := time.Now()
	for deadline := start.Add(180 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		select {
		case <-srv.done:
			t.Fatalf("gmtrouter serve exited early:\n%s", srv.tail())
		default:
		}
		// A new connection per attempt: the server binds its port only once it is ready, and
		// a connection that was refused waits out gRPC's reconnect backoff before retrying.
		conn, err := grpc.NewClient(srv.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "gmtrouter.v1.RouterService"})
		cancel()
		_ = conn.Close()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			t.Logf("gmtrouter serve SERVING on %s after %s", srv.addr, time.Since(start).Round(100*time.Millisecond))
			return srv
		}
	}
	srv.stop(syscall.SIGKILL)
	t.Fatalf("gmtrouter serve not SERVING after 180 s:\n%s", srv.tail())
	return nil
}

func (s *realServer) tail() string {
	b, _ := os.ReadFile(s.log)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// stop signals the server and waits for it (SIGKILL after 30 s).
func (s *realServer) stop(sig syscall.Signal) {
	select {
	case <-s.done:
		return
	default:
	}
	_ = s.cmd.Process.Signal(sig)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

func unitEmbedding(seed int) []float32 {
	v := make([]float32, 384)
	var norm float64
	for i := range v {
		x := math.Sin(float64(seed*1000 + i + 1))
		v[i] = float32(x)
		norm += x * x
	}
	for i := range v {
		v[i] /= float32(math.Sqrt(norm))
	}
	return v
}

func randomID(t *testing.T) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// TestAgainstRealServer drives the Python service end to end: Select, UpdateFeedback, a
// ranking change arriving on StreamPreferences, then the fallback once the server is killed.
func TestAgainstRealServer(t *testing.T) {
	srv := startRealServer(t)
	ctx := context.Background()
	// Generous deadlines while the service is up: this test checks behaviour, not latency,
	// on machines that may be busy. The fallback below uses the 50 ms default.
	s := newSelector(t, srv.addr, WithSelectTimeout(20*time.Second), WithFeedbackTimeout(30*time.Second))
	user := "go-user-" + randomID(t)
	a, b := "go-model-a", "go-model-b"
	cands := []ModelRef{{Model: a, LoRAName: "lora-a"}, {Model: b}}
	emb := unitEmbedding(1)
	selectOnce := func(sc *SelectionContext) *SelectionResult {
		t.Helper()
		res, err := s.Select(ctx, sc)
		if err != nil {
			t.Fatal(err)
		}
		if res.Method == FallbackMethod {
			t.Fatalf("unexpected fallback: %s\n%s", res.Reasoning, srv.tail())
		}
		return res
	}

	t.Run("Select", func(t *testing.T) {
		res := selectOnce(&SelectionContext{QueryEmbedding: emb, CandidateModels: cands, UserID: user, SessionID: "s1"})
		if res.SelectedModel != a && res.SelectedModel != b {
			t.Fatalf("selected %q", res.SelectedModel)
		}
		if len(res.AllScores) != 2 || res.Reasoning == "" || res.InteractionID == "" ||
			res.Confidence < 0 || res.Confidence > 1 {
			t.Fatalf("incomplete result %+v", res)
		}
		if res.SelectedModel == a && res.LoRAName != "lora-a" {
			t.Fatalf("LoRA name lost: %+v", res)
		}
		// The service embeds the text itself when no embedding is given.
		res = selectOnce(&SelectionContext{Query: "Write a haiku about autumn", CandidateModels: cands, UserID: user})
		t.Logf("text query: %s (%s) %s", res.SelectedModel, res.Method, res.Reasoning)
		// Latency with the default 50 ms deadline, for the record.
		fast := newSelector(t, srv.addr)
		var lat []time.Duration
		fallbacks := 0
		for range 20 {
			start := time.Now()
			r, err := fast.Select(ctx, &SelectionContext{QueryEmbedding: emb, CandidateModels: cands, UserID: user})
			if err != nil {
				t.Fatal(err)
			}
			lat = append(lat, time.Since(start))
			if r.Method == FallbackMethod {
				fallbacks++
			}
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		t.Logf("Select with an embedding, 50 ms deadline: p50 %s, max %s, %d/20 fell back", lat[10], lat[19], fallbacks)
	})

	var cache *PreferenceCache
	updates := make(chan Preference, 64)
	waitFirst := func(best string, within time.Duration) Preference {
		t.Helper()
		deadline := time.After(within)
		for {
			select {
			case p := <-updates:
				if p.UserID == user && len(p.Ranking) == 2 && p.Ranking[0].Model == best {
					return p
				}
			case <-deadline:
				r, _ := cache.Ranking(user)
				t.Fatalf("no ranking with %s first within %s (cache: %v)\n%s", best, within, r, srv.tail())
			}
		}
	}

	var first Preference
	t.Run("UpdateFeedback and StreamPreferences", func(t *testing.T) {
		ts := time.Now().Unix()
		fb := &Feedback{Query: "q0", Response: "r", WinnerModel: a, LoserModel: b, UserID: user,
			SessionID: "s1", Timestamp: ts, FeedbackType: "satisfied", Confidence: 0.9}
		if err := s.UpdateFeedback(ctx, fb); err != nil {
			t.Fatal(err)
		}
		if err := s.UpdateFeedback(ctx, fb); err != nil { // a retry: recorded once
			t.Fatal(err)
		}
		if st := s.Stats(); st.DuplicateFeedbacks != 1 {
			t.Fatalf("the resend was not a duplicate: %+v", st)
		}
		var err error
		cache, err = s.WatchPreferences(ctx, []string{user}, cands, func(p Preference) { updates <- p })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(cache.Close)
		first = waitFirst(a, 30*time.Second)
		for i := 1; i <= 3; i++ { // b overtakes a
			if err := s.UpdateFeedback(ctx, &Feedback{Query: fmt.Sprintf("q%d", i), WinnerModel: b, LoserModel: a,
				UserID: user, SessionID: "s1", Timestamp: ts + int64(i)}); err != nil {
				t.Fatal(err)
			}
		}
		second := waitFirst(b, 30*time.Second)
		if second.Version <= first.Version || second.Ranking[0].Score <= second.Ranking[1].Score {
			t.Fatalf("ranking update %+v after %+v", second, first)
		}
		if r, ok := cache.Ranking(user); !ok || r[0].Model != b {
			t.Fatalf("cache ranking %v %v", r, ok)
		}
		res := selectOnce(&SelectionContext{QueryEmbedding: emb, CandidateModels: cands, UserID: user})
		if res.SelectedModel != b || res.AllScores[b] <= res.AllScores[a] {
			t.Fatalf("after b won 3 of 4: %+v", res)
		}
	})

	t.Run("fallback when the server is gone", func(t *testing.T) {
		fast := newSelector(t, srv.addr) // 50 ms default
		// Warm the connection, so the outage hits an established channel.
		if _, err := fast.Select(ctx, &SelectionContext{QueryEmbedding: emb, CandidateModels: cands, UserID: user}); err != nil {
			t.Fatal(err)
		}
		// A hung server (SIGSTOP): the deadline, not the connection, ends the call.
		if err := srv.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		res, err := fast.Select(ctx, &SelectionContext{QueryEmbedding: emb, CandidateModels: cands, UserID: user})
		took := time.Since(start)
		if err != nil || res.SelectedModel != a || res.Method != FallbackMethod {
			t.Fatalf("hung server: want the first candidate as fallback, got %+v %v", res, err)
		}
		if took > DefaultSelectTimeout+250*time.Millisecond {
			t.Fatalf("fallback from a hung server took %s", took)
		}
		t.Logf("hung server: fallback in %s: %s", took.Round(time.Millisecond), res.Reasoning)
		srv.stop(syscall.SIGKILL) // a stopped process dies on SIGKILL too
		for i := range 3 {
			start := time.Now()
			res, err := fast.Select(ctx, &SelectionContext{QueryEmbedding: emb, CandidateModels: cands, UserID: user})
			took := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			if res.SelectedModel != a || res.LoRAName != "lora-a" || res.Method != FallbackMethod {
				t.Fatalf("want the first candidate as fallback, got %+v", res)
			}
			if took > DefaultSelectTimeout+250*time.Millisecond {
				t.Fatalf("fallback %d took %s", i, took)
			}
			t.Logf("fallback %d in %s: %s", i, took.Round(time.Millisecond), res.Reasoning)
		}
		if err := s.UpdateFeedback(ctx, &Feedback{Query: "q", WinnerModel: a, UserID: user}); err == nil {
			t.Fatal("feedback to a dead server must fail")
		}
		// The cache keeps the last ranking while it reconnects.
		if r, ok := cache.Ranking(user); !ok || r[0].Model != b {
			t.Fatalf("cache lost its ranking: %v %v", r, ok)
		}
		deadline := time.Now().Add(5 * time.Second)
		for cache.Connected() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if cache.Connected() {
			t.Fatal("cache still reports a connection to a killed server")
		}
	})
}
