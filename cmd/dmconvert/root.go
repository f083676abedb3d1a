package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// run executes the command line and returns the process exit code.
func run(args []string) int {
	root := &cobra.Command{
		Use:           "dmconvert",
		Short:         "change how a live block device is encrypted, while it is in use",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "dmconvert:", err)
		return 1
	}
	return 0
}
