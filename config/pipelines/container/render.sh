#!/bin/sh
# Runs inside the container step `render` (config/pipelines/report.toml): reads the
# Python step's profile from /in/profile and writes /out/report/report.txt.
set -eu
mkdir -p /out/report
{
    printf '%s\n' "$TITLE"
    printf '%s\n' "$TITLE" | sed 's/./=/g'
    awk -F, 'NR == 1 { printf "%-10s", $1; for (i = 2; i <= NF; i++) printf " %14s", $i; print ""; next }
             { printf "%-10s", $1; for (i = 2; i <= NF; i++) printf " %14.3f", $i; print "" }' \
        /in/profile/profile.csv
    echo
    echo "rendered in run $MILLRACE_RUN_ID by $(uname -s) $(busybox | head -1 | cut -d' ' -f1-2)"
} > /out/report/report.txt
echo "report: $(wc -l < /out/report/report.txt) lines"
