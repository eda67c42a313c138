# frozen_string_literal: true

# The gems of release-tasks, built by scripts/dist from a staged directory (the current one): one per
# platform (x86_64-linux, aarch64-linux) with the static binary in libexec/, and one for the `ruby`
# platform without it. The version and platform come from scripts/dist, which reads Cargo.toml.
Gem::Specification.new do |spec|
  spec.name = "release-tasks"
  spec.version = ENV.fetch("RELEASE_TASKS_GEM_VERSION")
  spec.platform = ENV.fetch("RELEASE_TASKS_GEM_PLATFORM")
  spec.summary = ENV.fetch("RELEASE_TASKS_GEM_SUMMARY")
  spec.description = "A static binary for a Procfile's release: line: reads release.toml, gates each " \
                     "task on environment variables, runs them with timeouts and signal forwarding, " \
                     "and fails the release with the failed task's exit status."
  spec.authors = ["release-tasks contributors"]
  spec.license = "MIT"
  homepage = ENV.fetch("RELEASE_TASKS_GEM_HOMEPAGE", "")
  spec.homepage = homepage unless homepage.empty?
  spec.required_ruby_version = ">= 2.6"
  spec.files = Dir["exe/release-tasks", "libexec/release-tasks", "README.md", "LICENSE"]
  spec.bindir = "exe"
  spec.executables = ["release-tasks"]
end
