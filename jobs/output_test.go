package jobs

import "testing"

func TestCapOutput(t *testing.T) {
	const cut = "\n[... 10 bytes omitted ...]\n"
	zero, ten := int64(0), int64(10)
	tests := []struct {
		name           string
		out            string
		limit          int
		gatewayOmitted *int64
		want           string
		wantTruncated  bool
		wantTotal      int
	}{
		{"short, gateway silent", "abc", 0, nil, "abc", false, 3},
		{"short, gateway says uncut", "abc", 100, &zero, "abc", false, 3},
		{"gateway cut, said only by its line", "a" + cut + "b", 0, nil, "a" + cut + "b", true, 12},
		{"gateway cut, and says so", "a" + cut + "b", 0, &ten, "a" + cut + "b", true, 12},
		{"the command's own cut line", "a" + cut + "b", 0, &zero, "a" + cut + "b", false, 2 + len(cut)},
		{"gateway cut, its line and the command's", "a" + cut + "b" + cut + "c", 0, &ten, "a" + cut + "b" + cut + "c", true, 13 + len(cut)},
		{"cut here", "0123456789", 4, &zero, "01\n[... 6 bytes omitted ...]\n89", true, 10},
		{"cut here after the gateway", "a" + cut + "bcdefgh", 6, &ten, "a\n[\n[... 30 bytes omitted ...]\nfgh", true, 18},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, truncated, total := capOutput(tt.out, tt.limit, tt.gatewayOmitted)
			if got != tt.want || truncated != tt.wantTruncated || total != tt.wantTotal {
				t.Errorf("capOutput(%q, %d) = %q, %v, %d; want %q, %v, %d", tt.out, tt.limit, got, truncated, total, tt.want, tt.wantTruncated, tt.wantTotal)
			}
		})
	}
}
