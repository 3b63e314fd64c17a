package jobs

import (
	"context"
	"fmt"

	"github.com/boxq/boxq/sandboxpool"
)

// MatchTasks returns the tasks that have a sandbox record and whose id
// matches glob (sandboxpool.GlobSyntax), in byte order: the tasks a
// fan-out (enqueue -tasks) runs in. It reads the pool's index of task ids
// from the glob's literal prefix: its cost follows the tasks that start
// with the prefix, not the pool's size.
func (p *Producer) MatchTasks(ctx context.Context, glob string) ([]string, error) {
	g, err := sandboxpool.CompileGlob(glob)
	if err != nil {
		return nil, fmt.Errorf("invalid task glob: %w", err)
	}
	return sandboxpool.NewIndex(p.rdb, p.cfg.Prefix).Match(ctx, g)
}
