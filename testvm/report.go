package testvm

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Report is the summary RunTestsInGuest writes as JSON into
// $DMCONVERT_VM_REPORT_DIR (one file per run), so make test can print
// the total of guest tests across packages.
type Report struct {
	Package       string  `json:"package"`        // import path of the package under test
	Test          string  `json:"test"`           // the host test that booted the VM (TestVM)
	Kernel        string  `json:"kernel"`         // guest uname -r
	KernelPackage string  `json:"kernel_package"` // Debian package and version
	Ran           int     `json:"ran"`            // top-level guest tests that reported a result
	Passed        int     `json:"passed"`
	Failed        int     `json:"failed"`
	Skipped       int     `json:"skipped"`
	Benchmarks    int     `json:"benchmarks"`
	BootSeconds   float64 `json:"boot_seconds"`  // QEMU start to the guest being ready
	TotalSeconds  float64 `json:"total_seconds"` // QEMU start to QEMU exit
}

func (r Report) write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("testvm report: %w", err)
	}
	name := strings.NewReplacer("/", "_", ".", "_").Replace(r.Package+"."+r.Test) + ".json"
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("testvm report: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("testvm report: %w", err)
	}
	return nil
}

// ReadReports reads every report in dir, sorted by package and test.
func ReadReports(dir string) ([]Report, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, fmt.Errorf("testvm reports in %s: %w", dir, err)
	}
	var out []Report
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("testvm report: %w", err)
		}
		var r Report
		if err := json.Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("testvm report %s: %w", f, err)
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Package != out[j].Package {
			return out[i].Package < out[j].Package
		}
		return out[i].Test < out[j].Test
	})
	return out, nil
}
