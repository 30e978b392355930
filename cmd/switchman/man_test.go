package main

import (
	"strings"
	"testing"
)

// TestManPageNamesEveryFlag: the page is roff for section 8 and names
// every command and every flag of the agent, so it cannot fall behind
// the CLI.
func TestManPageNamesEveryFlag(t *testing.T) {
	page, err := manPage(newApp())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(page, "\n.TH switchman 8\n") {
		t.Fatalf("not a section 8 roff page: %.80q", page)
	}
	want := []string{"SWITCHMAN_", "/etc/default/switchman", "ENVIRONMENT", "FILES"}
	for _, cmd := range newApp().Commands {
		if cmd.Hidden {
			if strings.Contains(page, "\n"+cmd.Name+"\n") {
				t.Errorf("hidden command %s is on the page", cmd.Name)
			}
			continue
		}
		want = append(want, cmd.Name)
		if cmd.Name != "agent" {
			continue
		}
		for _, f := range cmd.Flags {
			want = append(want, `\fB--`+f.Names()[0]+`\fP`)
		}
	}
	for _, w := range want {
		if !strings.Contains(page, w) {
			t.Errorf("the page lacks %q", w)
		}
	}
}
