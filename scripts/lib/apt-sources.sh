# Shared by scripts/vm-lane and scripts/build-managed-plugins (sourced, not run): this machine's own
# apt sources, so that private apt configurations and debootstrap use the mirrors the machine already
# uses (no mirror host name is written anywhere in the repository).

codename() { (. /etc/os-release && echo "${VERSION_CODENAME:?}"); }

# "SIGNED_BY URI SUITE COMPONENTS..." for every enabled deb source of this machine (one-line
# sources.list/*.list and deb822 *.sources). SIGNED_BY is "-" when absent or an inline key.
system_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk '{ sub(/#.*/, "") }
             $1 == "deb" {
                 i = 2; sb = "-"
                 if ($2 ~ /^\[/) {
                     for (; i <= NF; i++) {
                         if ($i ~ /signed-by=/) {
                             sb = $i; sub(/.*signed-by=/, "", sb); sub(/\]$/, "", sb)
                         }
                         if ($i ~ /\]$/) { i++; break }
                     }
                 }
                 line = sb " " $i " " $(i + 1)
                 for (j = i + 2; j <= NF; j++) line = line " " $j
                 print line
             }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk 'function flush(   n, m, u, s, i, j) {
                 if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
                     n = split(uris, u, " "); m = split(suites, s, " ")
                     for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                         print (sb == "" ? "-" : sb) " " u[i] " " s[j] " " comps
                 }
                 types = uris = suites = comps = sb = enabled = ""; field = ""
             }
             /^#/ { next }
             /^[ \t]*$/ { flush(); next }
             /^[ \t]/ { if (field == "signed-by") sb = "-"; next }   # continuation: inline key
             {
                 field = tolower($1); sub(/:$/, "", field); v = $0; sub(/^[^:]*:[ \t]*/, "", v)
                 if (field == "types") types = v
                 else if (field == "uris") uris = v
                 else if (field == "suites") suites = v
                 else if (field == "components") comps = v
                 else if (field == "enabled") enabled = v
                 else if (field == "signed-by") {
                     sb = v; gsub(/[ \t]+/, ",", sb); if (sb == "") sb = "-"
                 }
             }
             END { flush() }' "$f"
    done
}
