package gmtrouter

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	routerv1 "github.com/gmtrouter/gmtrouter/protos/gen/go/gmtrouter/v1"
)

func userIDs(from, to int) []string {
	var out []string
	for i := from; i < to; i++ {
		out = append(out, fmt.Sprintf("u%d", i))
	}
	return out
}

// streamLog is a fake StreamPreferences that records each stream's user ids, sends one
// ranking per user and stays open.
type streamLog struct {
	mu   sync.Mutex
	reqs [][]string
}

func (l *streamLog) serve(_ int, req *routerv1.StreamPreferencesRequest, srv routerv1.RouterService_StreamPreferencesServer) error {
	l.mu.Lock()
	l.reqs = append(l.reqs, slices.Clone(req.UserIds))
	l.mu.Unlock()
	for _, u := range req.UserIds {
		upd := &routerv1.PreferenceUpdate{UserId: u, Version: 1, Method: "bt_prior",
			Preferences: []*routerv1.ModelPreference{{Model: "m-b", Score: 1}, {Model: "m-a"}}}
		if err := srv.Send(upd); err != nil {
			return err
		}
	}
	<-srv.Context().Done()
	return nil
}

func (l *streamLog) requests() [][]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.reqs)
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// checkCover fails unless reqs has want streams, none over limit ids, covering users
// exactly once.
func checkCover(t *testing.T, reqs [][]string, want, limit int, users []string) {
	t.Helper()
	if len(reqs) != want {
		t.Fatalf("%d streams, want %d", len(reqs), want)
	}
	seen := map[string]int{}
	for _, r := range reqs {
		if len(r) > limit {
			t.Fatalf("a stream of %d user ids (limit %d)", len(r), limit)
		}
		for _, u := range r {
			seen[u]++
		}
	}
	if len(seen) != len(users) {
		t.Fatalf("streams cover %d users, want %d", len(seen), len(users))
	}
	for _, u := range users {
		if seen[u] != 1 {
			t.Fatalf("user %s is in %d streams", u, seen[u])
		}
	}
}

func TestPreferenceCacheSplitsUsersOverStreams(t *testing.T) {
	log := &streamLog{}
	f := &fakeRouter{stream: log.serve, maxUsers: 1000}
	s := newSelector(t, startFake(t, f), WithMaxStreamUsers(1000), WithSelectTimeout(5*time.Second),
		WithStreamBackoff(10*time.Millisecond, 50*time.Millisecond))
	// Connect first, so that the connection's own goroutines are counted in before.
	if _, err := s.Select(context.Background(), &SelectionContext{Query: "q", UserID: "u", CandidateModels: twoModels}); err != nil {
		t.Fatal(err)
	}
	before := runtime.NumGoroutine()

	users := userIDs(0, 2500)
	var mu sync.Mutex
	got := map[string]bool{}
	cache, err := s.WatchPreferences(context.Background(), users, twoModels, func(p Preference) {
		mu.Lock()
		got[p.UserID] = true
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	received := func(n int) func() bool {
		return func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == n }
	}
	waitUntil(t, "a ranking of all 2,500 users", received(2500))
	checkCover(t, log.requests(), 3, 1000, users)
	for _, u := range []string{"u0", "u999", "u1000", "u1999", "u2000", "u2499"} { // every chunk
		if r, ok := cache.Ranking(u); !ok || r[0].Model != "m-b" {
			t.Fatalf("%s: ranking %v %v", u, r, ok)
		}
	}
	if !cache.Connected() {
		t.Fatal("not connected")
	}

	// Follow past 3,000: the set is reopened as 4 streams.
	more := userIDs(2500, 3100)
	cache.Follow(more...)
	waitUntil(t, "a ranking of all 3,100 users", received(3100))
	waitUntil(t, "7 streams", func() bool { return len(log.requests()) == 7 })
	checkCover(t, log.requests()[3:], 4, 1000, append(slices.Clone(users), more...))
	f.mu.Lock()
	calls := f.streams
	f.mu.Unlock()
	if calls != 7 {
		t.Fatalf("%d stream calls; want 7 (3 + 4, none refused or retried)", calls)
	}

	cache.Close()
	if cache.Connected() {
		t.Fatal("connected after Close")
	}
	deadline := time.Now().Add(3 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after Close, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPreferenceCacheRejectedStreamWaitsLongestBackoff(t *testing.T) {
	log := &streamLog{}
	f := &fakeRouter{stream: log.serve, maxUsers: 1000}
	// More per stream than the service allows: every attempt is refused (INVALID_ARGUMENT).
	s := newSelector(t, startFake(t, f), WithMaxStreamUsers(2000),
		WithStreamBackoff(5*time.Millisecond, time.Second))
	cache, err := s.WatchPreferences(context.Background(), userIDs(0, 1500), twoModels, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	time.Sleep(400 * time.Millisecond)
	f.mu.Lock()
	n := f.streams
	f.mu.Unlock()
	// The retry waits 0.5–1 s (the longest backoff, with jitter), not 5, 10, 20… ms.
	if n != 1 {
		t.Fatalf("%d attempts in 400 ms; a refused stream must wait the longest backoff", n)
	}
	if cache.Connected() || len(log.requests()) != 0 {
		t.Fatal("a refused stream must not connect")
	}
}
