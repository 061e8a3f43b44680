package gmtrouter_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/gmtrouter/gmtrouter/clients/go/gmtrouter"
)

// A Go router plugs the selector in where it keeps its selection methods, calls Select on
// each request and UpdateFeedback when it learns which answer the user preferred.
func Example() {
	sel, err := gmtrouter.New("gmtrouter.default.svc.cluster.local:50051",
		gmtrouter.WithSelectTimeout(50*time.Millisecond), // fall back after 50 ms
		gmtrouter.WithFeedbackTimeout(2*time.Second),     // feedback may take longer
		// gmtrouter.WithTLS(gmtrouter.TLSFiles{CAFile: "/etc/gmtrouter/ca.crt"}),
		// gmtrouter.WithBearerTokenFile("/var/run/secrets/gmtrouter/token"),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer sel.Close()
	ctx := context.Background()

	candidates := []gmtrouter.ModelRef{{Model: "gpt-4o"}, {Model: "llama-3-70b", LoRAName: "support"}}
	res, err := sel.Select(ctx, &gmtrouter.SelectionContext{
		Query:           "How do I rotate a Kubernetes secret?",
		CandidateModels: candidates,
		UserID:          "user-42", // from a trusted authentication header
		SessionID:       "conv-7",
	})
	if err != nil { // only for an invalid request (no candidates, a blank model name)
		log.Fatal(err)
	}
	// res.Method is "gmtrouter_fallback" when the service did not answer in time.
	fmt.Println(res.SelectedModel, res.Method, res.AllScores, res.Reasoning)

	// Later: the user preferred the other model's answer.
	err = sel.UpdateFeedback(ctx, &gmtrouter.Feedback{
		Query:       "How do I rotate a Kubernetes secret?",
		WinnerModel: "llama-3-70b",
		LoserModel:  "gpt-4o",
		UserID:      "user-42",
		SessionID:   "conv-7",
		Timestamp:   time.Now().Unix(),
	})
	if err != nil {
		log.Print(err) // feedback is best effort for a router
	}

	// Keep the user's ranking in memory, updated as the service learns.
	cache, err := sel.WatchPreferences(ctx, []string{"user-42"}, candidates, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer cache.Close()
	if ranking, ok := cache.Ranking("user-42"); ok {
		fmt.Println("best for user-42:", ranking[0].Model)
	}
}
