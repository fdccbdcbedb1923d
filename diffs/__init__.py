"""The diff itself: the sparse-diff artifact format, its index coding, composing, applying
and validating diffs, statistics and interference between diffs, and the base they are against."""
