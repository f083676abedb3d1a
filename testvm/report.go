package testvm

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Report is the summary RunTestsInGuest writes as JSON into
// $DMCONVERT_VM_REPORT_DIR (one file per run), so make test can print
// the total of guest tests across packages.
type Report struct {
	Package       string   `json:"package"`        // import path of the package under test
	Test          string   `json:"test"`           // the host test that booted the VM (TestVM)
	Kernel        string   `json:"kernel"`         // guest uname -r
	KernelPackage string   `json:"kernel_package"` // Debian package and version
	Ran           int      `json:"ran"`            // top-level guest tests that reported a result
	Passed        int      `json:"passed"`
	Failed        int      `json:"failed"`
	Skipped       int      `json:"skipped"`
	Benchmarks    int      `json:"benchmarks"`
	Tests         []string `json:"tests"` // names of the guest tests that reported a result
	// Seconds is each guest test's own elapsed time, as go test reported it
	// in the guest (tests of one VM may overlap: they run with -parallel).
	Seconds      map[string]float64 `json:"seconds,omitempty"`
	BootSeconds  float64            `json:"boot_seconds"`  // QEMU start to the guest being ready
	TotalSeconds float64            `json:"total_seconds"` // QEMU start to QEMU exit
	CPUSeconds   float64            `json:"cpu_seconds"`   // host CPU (user+sys) of the QEMU process
	// Started is when QEMU started (Unix seconds), to see how the VMs of
	// a run were scheduled against one another.
	Started float64 `json:"started,omitempty"`
}

// Save writes r into $DMCONVERT_VM_REPORT_DIR, if set: for VMs that a
// test boots itself (testvm.Start), not through RunTestsInGuest.
func (r Report) Save() error {
	if dir := os.Getenv(EnvReportDir); dir != "" {
		return r.write(dir)
	}
	return nil
}

func (r Report) write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("testvm report: %w", err)
	}
	base := strings.NewReplacer("/", "_", ".", "_").Replace(r.Package + "." + r.Test)
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("testvm report: %w", err)
	}
	// One host test may boot several VMs (TestVM of convert boots twice):
	// each boot gets a file of its own.
	for i := 1; ; i++ {
		name := base + ".json"
		if i > 1 {
			name = fmt.Sprintf("%s.%d.json", base, i)
		}
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("testvm report: %w", err)
		}
		_, werr := f.Write(append(data, '\n'))
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		if werr != nil {
			return fmt.Errorf("testvm report: %w", werr)
		}
		return nil
	}
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

// DeclaredGuestTests scans a module for guest tests: it returns, per
// package import path, the names of the TestGuest* functions its test
// files declare. make test checks each of them ran in some VM (a package
// whose TestVM is missing or skipped would otherwise go unnoticed).
func DeclaredGuestTests(moduleRoot string) (map[string][]string, error) {
	modPath, err := modulePath(filepath.Join(moduleRoot, "go.mod"))
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	fset := token.NewFileSet()
	err = filepath.WalkDir(moduleRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if p != moduleRoot && (name == "testdata" || name == "vendor" || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_")) {
				return filepath.SkipDir
			}
			if p != moduleRoot {
				if _, err := os.Stat(filepath.Join(p, "go.mod")); err == nil {
					return filepath.SkipDir // another module
				}
			}
			return nil
		}
		if !strings.HasSuffix(name, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, parser.SkipObjectResolution)
		if err != nil {
			return fmt.Errorf("testvm: %w", err)
		}
		rel, _ := filepath.Rel(moduleRoot, filepath.Dir(p))
		pkg := modPath
		if rel != "." {
			pkg += "/" + filepath.ToSlash(rel)
		}
		for _, decl := range f.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if ok && fn.Recv == nil && strings.HasPrefix(fn.Name.Name, "TestGuest") {
				out[pkg] = append(out[pkg], fn.Name.Name)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, names := range out {
		sort.Strings(names)
	}
	return out, nil
}

func modulePath(gomod string) (string, error) {
	f, err := os.Open(gomod)
	if err != nil {
		return "", fmt.Errorf("testvm: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module "); ok {
			return strings.Trim(strings.TrimSpace(m), `"`), nil
		}
	}
	return "", fmt.Errorf("testvm: %s has no module line", gomod)
}

// MissingGuestTests returns, sorted, "pkg.TestGuestX" for every declared
// guest test that no report shows as run.
func MissingGuestTests(declared map[string][]string, reps []Report) []string {
	ran := map[string]bool{}
	for _, r := range reps {
		for _, n := range r.Tests {
			ran[r.Package+"."+n] = true
		}
	}
	var missing []string
	for pkg, names := range declared {
		for _, n := range names {
			if !ran[pkg+"."+n] {
				missing = append(missing, pkg+"."+n)
			}
		}
	}
	sort.Strings(missing)
	return missing
}
