#!/usr/bin/env bash
# Every markdown file in the repository renders as written. For each `git ls-files '*.md'`:
#   1. its code-fence lines (``` or ~~~, up to three spaces of indent) come in pairs, so no fence is
#      left open to swallow the rest of the file;
#   2. the headings written outside code blocks (ATX `# ...` and setext `===` / `---` underlines)
#      are exactly the <h1>..<h6> that cmark-gfm (GitHub-flavoured markdown) renders, so no comment
#      in a code block turned into a heading and no heading vanished into a code block;
#   3. every table written outside code blocks (a run of lines starting with `|`) renders as a <table>,
#      so none lost its |---| delimiter row and came out as a paragraph of pipes.
# Fails listing every file that does not. Needs Debian's cmark-gfm (tools/setup.sh installs it for CI).
# Usage, from anywhere:  bash .ci/markdown.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

command -v cmark-gfm >/dev/null ||
  { echo "markdown: cmark-gfm not found; install it with: apt-get install cmark-gfm" >&2; exit 1; }

# Prints "<fence lines> <headings outside code blocks>" for the markdown file $1, as the author wrote
# them: a fence opens with three or more ` or ~, and the next line starting with at least as many of
# the same character closes it. (CommonMark would not close on "```sh": it takes it as code. Counting
# it as a fence here is what makes a misplaced opener show up as an odd count or a heading mismatch.)
count_written() {
  awk '
    function fence_run(line,   m) {            # the run of ` or ~ that starts a fence line, or ""
      if (match(line, /^ ? ? ?(````*|~~~~*)/)) { m = substr(line, RSTART, RLENGTH); sub(/^ +/, "", m); return m }
      return ""
    }
    BEGIN { in_code = 0; fences = 0; headings = 0; tables = 0; prev_text = 0; prev_row = 0 }
    {
      row = ($0 ~ /^ ? ? ?\|/)
      if (row && !prev_row && !in_code) tables++
      prev_row = row && !in_code
      run = fence_run($0)
      if (in_code) {
        if (run != "" && substr(run, 1, 1) == open_char && length(run) >= open_len) {
          in_code = 0; fences++
        }
        prev_text = 0; next
      }
      if (run != "") {
        in_code = 1; fences++; open_char = substr(run, 1, 1); open_len = length(run); prev_text = 0; next
      }
      if ($0 ~ /^ ? ? ?##?#?#?#?#?([ \t]|$)/) { headings++; prev_text = 0; next }
      # a setext underline turns the paragraph line above it into a heading (a table row is not one)
      if (prev_text && ($0 ~ /^ ? ? ?=+[ \t]*$/ || $0 ~ /^ ? ? ?-+[ \t]*$/)) { headings++; prev_text = 0; next }
      prev_text = ($0 !~ /^[ \t]*$/ && $0 !~ /^    / && $0 !~ /\|/ && $0 !~ /^ ? ? ?([-*+]|[0-9]+[.)])[ \t]/ \
                   && $0 !~ /^ ? ? ?>/)
    }
    END { print fences, headings, tables }
  ' "$1"
}

bad=()
while IFS= read -r file; do
  read -r fences written tables < <(count_written "$file")
  html="$(cmark-gfm --extension table --extension strikethrough --extension autolink "$file")"
  rendered="$( (grep -o '<h[1-6][ >]' <<<"$html" || true) | wc -l)"
  rendered_tables="$( (grep -o '<table>' <<<"$html" || true) | wc -l)"
  problems=()
  (( fences % 2 == 0 )) || problems+=("$fences code-fence lines (odd: a fence is never closed)")
  (( written == rendered )) ||
    problems+=("$written headings written outside code blocks, cmark-gfm renders $rendered")
  (( tables == rendered_tables )) ||
    problems+=("$tables tables written outside code blocks, cmark-gfm renders $rendered_tables (a |---| row missing?)")
  if (( ${#problems[@]} > 0 )); then
    bad+=("$file")
    for problem in "${problems[@]}"; do printf 'markdown: %s: %s\n' "$file" "$problem" >&2; done
  fi
done < <(git ls-files '*.md')

if (( ${#bad[@]} > 0 )); then
  echo "markdown: ${#bad[@]} file(s) do not render as written: ${bad[*]}" >&2
  echo "markdown: hint: look for a \`\`\` that opens where one should close, or a table without its |---| row" >&2
  exit 1
fi
echo "markdown: every markdown file renders as written ($(git ls-files '*.md' | wc -l) files)"
